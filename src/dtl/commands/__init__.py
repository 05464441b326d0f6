"""One module per group of CLI verbs; each exposes `register(subparsers)`."""
