"""Local stand-ins for production infrastructure (a private Mosquitto, ...) used by the demo and
the tests. Not part of the installed product: the product talks to whatever broker and database
its configuration names."""
