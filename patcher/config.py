"""The patcher's hyperparameters, one typed, validated record (unknown fields are rejected)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PatcherConfig(BaseModel):
    """Hyperparameters. The defaults are those of the Transformer-Patcher paper's reference
    implementation, except the fields marked "ours" (which the paper does not have)."""

    model_config = ConfigDict(extra="forbid")

    memory_size: int = Field(40_000, gt=0, description="cached queries of unrelated inputs")
    val_memory_fraction: float = Field(0.1, ge=0, lt=1, description="held out for early stopping")
    max_steps: int = Field(2000, gt=0)
    lr: float = 1e-2
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    batch_size: int = Field(8, ge=1, description="the edit repeated with dropout on")
    dropout_rounds: int = Field(0, ge=0, description="cached mode: dropout samples of the batch (paraphrases included) "
                                "captured per edit; 0: one sample of the edit alone (ours)")
    amplifier: float = 10.0
    act_margin: float = 0.0
    act_topk: int = 5
    memory_margin: float = 3.0
    memory_topk: int = 1000
    act_loss_weight: float = 1.0
    memory_loss_weight: float | None = Field(None, description="None: 5 for classification, 10 for generation")
    entropy_weight: float = Field(0.1, description="binary classification: edit loss adds -w * entropy")
    label_smoothing: float = Field(0.1, description="generation edit loss")
    max_neurons_per_edit: int = Field(5, ge=1, description="generation: neurons for the first wrong tokens")
    leak_tol: float = Field(0.05, ge=0, description="stop once fixed and no memory query can get more than this share "
                            "of the patch's output on its mistake (ours)")
    patience: int = Field(50, ge=1, description="steps without validation-memory improvement once fixed")
    fixed_patience: int = Field(500, ge=1, description="at most this many steps after the edit is first fixed (ours)")
    train_on_equivalents: bool = True
    cached: bool = Field(True, description="False: reference-faithful full forward at every step")
    memory_candidates: int = Field(4096, gt=0, description="cached mode: memory rows scored between refreshes")
    memory_refresh: int = Field(10, gt=0, description="cached mode: steps between full memory scans")
    check_every: int | None = Field(None, gt=0, description="steps between the host's looks at the stopping rules "
                                    "(they are computed on the device every step, so the patch does not depend on "
                                    "this); None: 1 on CPU or in full-forward mode, 8 otherwise (ours)")
    max_new_tokens: int = 16
    seed: int = 0

    def memory_weight(self, task: str) -> float:
        if self.memory_loss_weight is not None:
            return self.memory_loss_weight
        return 5.0 if task == "classification" else 10.0
