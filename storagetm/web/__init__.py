"""The target's web page: status, instructions per OS, and each exported disk as a download."""
