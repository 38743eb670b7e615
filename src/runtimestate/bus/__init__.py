"""The message bus: one interface, in-process and NATS implementations."""
