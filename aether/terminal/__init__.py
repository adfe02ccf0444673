"""PTY sessions that outlive the WebSocket that started them (seed 001)."""
