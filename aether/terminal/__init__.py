"""Terminal sessions: PTYs and their processes, which outlive the client that started them."""
