"""What a caller hands the editor (one logged mistake) and what it gets back (one edit's outcome)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EditRequest:
    """One logged mistake: the input, what it should give, and paraphrases that must give it too."""

    id: str
    input: str
    target: int | str
    equivalents: list[str] = field(default_factory=list)


@dataclass
class EditResult:
    id: str
    fixed: bool
    already_correct: bool = False
    steps: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0  # of ``seconds``, the training loop alone (it ends with a device sync)
    neurons: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    message: str = ""
    validations: list[int] = field(default_factory=list)  # steps validated in eval mode (reference rule, scheduler)
    lr_drops: list[int] = field(default_factory=list)  # steps at which the plateau scheduler lowered the lr
