"""The bus: NATS for live fan-out and JetStream for the durable `.events` subjects."""

from switchboard.bus.connection import Bus, BusUnavailable, connect_bus

__all__ = ["Bus", "BusUnavailable", "connect_bus"]
