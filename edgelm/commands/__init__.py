"""The commands behind the CLI, each a module with one job: bench, describe (info), quantize, convert, repl (chat)."""
