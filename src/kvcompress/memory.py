"""What ``memory_report()`` returns: stored vs fp16-reference bytes per layer and in total, and the peak transient."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class LayerMemory:
    layer: int
    tokens: int
    stored_bytes: int
    reference_bytes: int

    @property
    def ratio(self) -> float:
        return self.reference_bytes / self.stored_bytes if self.stored_bytes else float("inf")


@dataclass
class MemoryReport:
    method: str
    layers: list[LayerMemory]
    peak_transient_bytes: int

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.layers)

    @property
    def reference_bytes(self) -> int:
        return sum(r.reference_bytes for r in self.layers)

    @property
    def ratio(self) -> float:
        return self.reference_bytes / self.stored_bytes if self.stored_bytes else float("inf")

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "stored_bytes": self.stored_bytes,
            "reference_bytes": self.reference_bytes,
            "ratio": self.ratio,
            "peak_transient_bytes": self.peak_transient_bytes,
            "layers": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in self.layers],
        }

    def __str__(self) -> str:
        return (
            f"{self.method}: {self.stored_bytes / 2**20:.3f} MiB stored vs {self.reference_bytes / 2**20:.3f} MiB "
            f"fp16 reference -> {self.ratio:.2f}x (peak transient {self.peak_transient_bytes / 2**20:.3f} MiB)"
        )
