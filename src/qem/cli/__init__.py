"""The ``qem`` command line: one module per subcommand."""
