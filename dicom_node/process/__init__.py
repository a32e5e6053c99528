"""Process: claim queued jobs, the QA gate, the model call (whole series or streamed), output QA."""
