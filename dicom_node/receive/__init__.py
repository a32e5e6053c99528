"""Receive: the C-STORE/C-ECHO SCP, what it validates and how it makes instances durable."""
