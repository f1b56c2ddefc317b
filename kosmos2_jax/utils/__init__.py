"""What every area shares: command-line helpers and errors, processes, safe outputs."""
