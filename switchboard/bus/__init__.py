"""The bus: NATS for live fan-out and JetStream for the durable `.events` subjects."""

from switchboard.bus.connection import Bus, connect_bus
from switchboard.outage import BusUnavailable

__all__ = ["Bus", "BusUnavailable", "connect_bus"]
