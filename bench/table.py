"""The benchmark's table: rows, the issue's targets, met or missed, text and JSON.

A ``Line`` is one row of the table: the mirror's figure, registry:2's, the figure
the ratio is taken against (registry:2's unless the row says otherwise), the
target and the server CPU-s/GB of both servers where the row serves blobs.
``Target`` says how a row is judged:

  ``Target(">=x", 1.2)``  mirror / base at least 1.2 (faster is better)
  ``Target("<=x", 0.5)``  mirror / base at most 0.5 (a time: lower is better)
  ``Target("<=", 100)``   the mirror's own figure at most 100
  ``Target("==", 1)``     the mirror's own figure exactly 1
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Target:
    kind: str       # ">=x" | "<=x" | "<=" | "=="
    value: float

    def __post_init__(self) -> None:
        if self.kind not in (">=x", "<=x", "<=", "=="):
            raise ValueError(f"unknown target kind {self.kind!r}")

    @property
    def text(self) -> str:
        v = f"{self.value:g}"
        return {">=x": f">= {v}x", "<=x": f"<= {v}x", "<=": f"<= {v}", "==": f"== {v}"}[self.kind]

    def met(self, mirror: float | None, base: float | None) -> bool | None:
        """None when the figures needed are missing (a row that did not run)."""
        if mirror is None:
            return None
        if self.kind == "<=":
            return mirror <= self.value
        if self.kind == "==":
            return mirror == self.value
        if not base:
            return None
        ratio = mirror / base
        return ratio >= self.value if self.kind == ">=x" else ratio <= self.value


@dataclass
class Line:
    key: str                        # stable name in the JSON
    label: str                      # as printed
    unit: str
    mirror: float | None
    registry2: float | None
    target: Target
    base: float | None = None       # what the ratio is against; registry2 when None
    base_name: str = "registry:2"
    cpu_mirror: float | None = None     # server CPU-s per GB served in this row
    cpu_registry2: float | None = None
    samples: dict = field(default_factory=dict)    # {"mirror": [...], "registry2": [...]}

    @property
    def against(self) -> float | None:
        return self.registry2 if self.base is None else self.base

    @property
    def ratio(self) -> float | None:
        if self.mirror is None or self.mirror < 0 or not self.against or self.against < 0:
            return None
        return self.mirror / self.against

    @property
    def met(self) -> bool | None:
        return self.target.met(self.mirror, self.against)

    def as_json(self) -> dict:
        data = asdict(self)
        data["target"] = {"kind": self.target.kind, "value": self.target.value,
                          "text": self.target.text}
        data.update(base=self.against, ratio=self.ratio, met=self.met)
        return data


def number(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def result(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "-"}[met]


HEADER = ("row", "mirror", "registry:2", "ratio", "target", "result",
          "CPU-s/GB mirror", "CPU-s/GB reg:2")


def format_table(lines: list[Line]) -> str:
    """The table as aligned text, one line per row (markdown-ish columns)."""
    cells = [HEADER]
    for line in lines:
        label = f"{line.label} ({line.unit})"
        ratio = "-" if line.ratio is None else f"{line.ratio:.2f}x"
        if line.base is not None:
            ratio += f" of {line.base_name}"
        cells.append((label, number(line.mirror), number(line.registry2), ratio,
                      line.target.text, result(line.met),
                      number(line.cpu_mirror), number(line.cpu_registry2)))
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    out = []
    for row in cells:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    return "\n".join(out)


def missed(lines: list[Line]) -> list[str]:
    return [line.label for line in lines if line.met is False]
