"""The patcher's hyperparameters, one typed, validated record (unknown fields are rejected).

``PatcherConfig()`` is our mode; ``PatcherConfig.reference(task)`` is the procedure of the
Transformer-Patcher reference code (github.com/ZeroYuHuang/Transformer-Patcher). Every way in
which the two differ is one of the fields below.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# torch.compile modes that record CUDA graphs. In our GPU runs (H200, torch 2.11, the scale benchmark)
# reduce-overhead crashed the process in the compiled backward, with cudagraph trees and without; max-autotune
# records the same graphs. The config refuses both.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


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
    dropout_rounds: int = Field(8, ge=0, description="cached mode: dropout samples of the batch (paraphrases included) "
                                "captured per edit, cycled through by the steps; 0: one sample of the edit alone (ours)")
    amplifier: float = 10.0
    act_margin: float = 0.0
    act_topk: int = 5
    memory_margin: float | None = Field(None, description="memory loss margin; None: matched to the model's "
                                        "activation (3 for GELU and ReLU, 8 for SiLU; see objective.matched_margin) (ours)")
    memory_topk: int = 1000
    clip_negative: bool = Field(False, description="patch neurons pass max(z, 0) to the model's activation, so one that "
                                "does not fire adds exactly nothing (no GELU/SiLU negative lobe on inputs it is silent "
                                "on); the patches then cannot be folded into a plain FFN (ours)")
    clip_threshold: float = Field(0.0, ge=0, description="with clip_negative: a neuron passes nothing until its "
                                  "pre-activation is above this, so inputs it fires on only weakly are left alone too; "
                                  "at most act_margin, which the activation loss asks of the mistake (ours)")
    edit_negatives: int = Field(0, ge=0, description="per edit, this many copies of the mistake with one of its rare "
                                "spans (names, mostly) swapped for another rare word of the memory texts; the new "
                                "neurons stay silent on them as on the memory, so they key on what the mistake is about, "
                                "not on its wording (patcher.negatives). Needs build_memory's texts. 0: none (ours)")
    negative_max_df: float = Field(0.02, gt=0, le=1, description="edit_negatives: a word is rare (swappable, and a "
                                   "replacement) if at most this share of the memory texts contain it (ours)")
    act_loss_weight: float = 1.0
    memory_loss_weight: float | None = Field(None, description="None: 5 for classification, 10 for generation")
    entropy_weight: float = Field(0.1, description="binary classification: edit loss adds -w * entropy")
    label_smoothing: float = Field(0.1, description="generation edit loss")
    max_neurons_per_edit: int = Field(5, ge=1, description="generation: neurons for the first wrong tokens")
    leak_tol: float = Field(0.01, ge=0, description="stop once fixed and no memory query can get more than this share "
                            "of the patch's output on its mistake (ours)")
    retry_neurons: int = Field(2, ge=1, description="an edit that training leaves unfixed is trained once more from "
                               "fresh neurons, this many per wrong position (ours); 1: no second try")
    patience: int = Field(50, ge=1, description="steps without validation-memory improvement once fixed")
    fixed_patience: int = Field(500, ge=1, description="at most this many steps after the edit is first fixed (ours)")
    train_on_equivalents: bool = True
    train_stop: bool = Field(True, description="decoder-only generation: train the answer followed by a stop (EOS, "
                             "newline or full stop, whichever the model ranks highest there) and judge the edit "
                             "fixed as served, by greedy generation; False: the answer alone, judged teacher-forced. "
                             "A seq2seq target ends with EOS already, as in the reference (ours)")
    cached: bool = Field(True, description="False: reference-faithful full forward at every step")
    memory_candidates: int | None = Field(None, gt=0, description="cached mode: per neuron, its highest memory rows at "
                                          "the last full scan, scored at each step (the union over the neurons); None: "
                                          "memory_topk, the rows the memory loss reads (ours)")
    memory_refresh: int = Field(10, gt=0, description="cached mode: steps between full memory scans")
    check_every: int | None = Field(None, gt=0, description="steps between the host's looks at the stopping rules "
                                    "(they are computed on the device every step, so the patch does not depend on "
                                    "this); None: 1 on CPU or in full-forward mode, 8 otherwise (ours)")
    compile: Literal["default", "max-autotune-no-cudagraphs"] | None = Field(
        None, description="cached mode: torch.compile each step's forward (the new neurons, the model's tail, the "
        "losses, the leak screen) and its backward with this mode. The first edit pays the compile (tens of "
        "seconds); needs a C++ compiler on CPU and triton on CUDA. The CUDA-graph modes are refused (see "
        "CUDA_GRAPH_MODES). None: eager (ours)")
    cuda_graph: bool = Field(False, description="cached mode on CUDA: record each edit's training step (forward, "
                             "backward, clip, Adam) as a CUDA graph after 3 ordinary steps and replay it, one launch "
                             "per step instead of hundreds; elsewhere the same step runs without a graph (no gain). "
                             "Not with lr_scheduler (a recorded update keeps its learning rate) (ours)")
    edit_batch: int = Field(1, ge=1, description="Editor.edit_batch: mistakes whose neurons train side by side "
                            "(several edits' worth of work per step, which small models on CPUs do in little more "
                            "time than one), then are kept in order, each only once checked on the model as the "
                            "ones before it left it; otherwise it is trained again alone (patcher.batching). Needs "
                            "cached mode, stop_rule leak, no lr_scheduler or cuda_graph, per-neuron top-k and our "
                            "edit memory. 1: one at a time (ours)")
    # ---- where our mode and the reference differ (the default is ours; see ``reference``)
    value_init: Literal["ours", "reference"] = Field(
        "ours", description="ours: values N(0,1)/sqrt(d) times one trainable amplifier per neuron; reference: "
        "values N(0,1) times a trainable amplifier per element (src/models/patch.py ModifyLinearInput)")
    loss_topk: Literal["per_neuron", "pooled"] = Field(
        "per_neuron", description="per_neuron (ours): the activation and memory top-k are taken per neuron, the "
        "memory margin against the clean mistake; pooled (reference): over every (memory row, batch row, neuron) "
        "together, against each batch row (src/models/patch.py top_k_loss_func)")
    label_smoothing_form: Literal["ours", "reference"] = Field(
        "ours", description="generation: ours spreads label_smoothing over all classes (torch); reference puts "
        "label_smoothing/(V-1) on each other class (src/utils.py label_smoothed_nll_loss)")
    lr_scheduler: Literal["plateau"] | None = Field(None, description="plateau: ReduceLROnPlateau on the validation "
                                                    "edit loss, stepped at each validation (reference)")
    lr_factor: float = Field(0.5, gt=0, lt=1, description="plateau scheduler factor")
    lr_patience: int = Field(1, ge=0, description="plateau scheduler patience (validations)")
    lr_threshold: float = Field(0.05, ge=0, description="plateau scheduler relative threshold")
    val_every: int | None = Field(None, gt=0, description="steps between validations; None (ours): every "
                                  "memory_refresh steps in cached mode, every step in full-forward mode")
    val_start: int = Field(0, ge=0, description="validations at an earlier step do not count for stopping")
    stop_rule: Literal["leak", "val_loss"] = Field(
        "leak", description="leak (ours): leak_tol, patience, fixed_patience; val_loss (reference): once fixed, stop "
        "when the validation-memory loss has not improved by early_threshold for early_patience validations")
    early_patience: int = Field(1, ge=1, description="val_loss rule: validations without improvement")
    early_threshold: float = Field(1e-3, ge=0, description="val_loss rule: an improvement is a drop by more than this")
    memory_unit: Literal["queries", "examples"] = Field(
        "queries", description="queries (ours): memory_size and val_memory_fraction count queries; examples "
        "(reference): they count texts, and a seq2seq decoder's first position is not read")
    edit_memory: Literal["ours", "reference"] = Field(
        "ours", description="after an edit, ours adds the queries it trained on to the training memory; reference "
        "adds the eval-mode queries of its batch (batch_size copies) to both memories")
    keep_unfixed: bool = Field(False, description="keep the neurons (and remember the queries) of an edit that "
                               "training did not fix (reference); ours removes them")
    max_new_tokens: int = 16
    seed: int = 0

    @field_validator("compile", mode="before")
    @classmethod
    def _no_cuda_graphs(cls, value):
        if value in CUDA_GRAPH_MODES:
            raise ValueError(f"compile={value!r} adds CUDA graphs, which crashed the process (a segmentation fault "
                             "in the compiled backward, reduce-overhead on an H200 with torch 2.11); use 'default' or "
                             "'max-autotune-no-cudagraphs'")
        return value

    @model_validator(mode="after")
    def _clip_threshold_below_act_margin(self) -> "PatcherConfig":
        if self.clip_threshold and not self.clip_negative:
            raise ValueError(f"clip_threshold={self.clip_threshold:g} applies to clipped neurons: set clip_negative=True")
        if self.clip_threshold > self.act_margin:
            raise ValueError(f"clip_threshold={self.clip_threshold:g} is above act_margin={self.act_margin:g}: the mistake "
                             f"itself could stay below the threshold, where the neuron passes nothing; set act_margin "
                             f">= clip_threshold")
        return self

    @model_validator(mode="after")
    def _compile_needs_cached(self) -> "PatcherConfig":
        if self.compile and not self.cached:
            raise ValueError("compile applies to the cached step only: set cached=True or compile=None")
        return self

    @model_validator(mode="after")
    def _cuda_graph_fixed_lr(self) -> "PatcherConfig":
        if self.cuda_graph and (not self.cached or self.lr_scheduler is not None):
            raise ValueError("cuda_graph records the cached step with a fixed learning rate: it needs cached=True "
                             "and lr_scheduler=None")
        return self

    @model_validator(mode="after")
    def _batch_needs_our_rules(self) -> "PatcherConfig":
        ours = dict(cached=True, stop_rule="leak", lr_scheduler=None, cuda_graph=False, loss_topk="per_neuron",
                    edit_memory="ours")
        off = [f"{k}={getattr(self, k)!r}" for k, v in ours.items() if getattr(self, k) != v]
        if self.edit_batch > 1 and off:
            raise ValueError(f"edit_batch={self.edit_batch} trains edits side by side with our cached step and "
                             f"stopping rules; it cannot with {', '.join(off)} (set edit_batch=1)")
        return self

    @classmethod
    def reference(cls, task: str, **overrides) -> "PatcherConfig":
        """The reference procedure for ``task`` ("classification" or "generation"), ``overrides`` on top.

        Values from github.com/ZeroYuHuang/Transformer-Patcher: src/utils.py (main_args,
        patch_related_args), scripts/main.py (mlc per task), scripts/T-patch.py (Trainer),
        src/models/class_modules.py and src/models/seq2seq_modules.py (the editors)."""
        if task not in ("classification", "generation"):
            raise ValueError(f"task must be 'classification' or 'generation', got {task!r}")
        values = dict(
            memory_size=40_000, max_steps=2000, lr=1e-2, weight_decay=0.01, grad_clip=5.0, batch_size=8,
            amplifier=10.0, act_margin=0.0, act_topk=5, memory_topk=1000, act_loss_weight=1.0,
            # the classifier passes margin_val1=3, margin_val2=-3; the seq2seq editor passes no margins (0, 0)
            memory_margin=3.0 if task == "classification" else 0.0,
            memory_loss_weight=5.0 if task == "classification" else 10.0,
            entropy_weight=0.1, label_smoothing=0.1, max_neurons_per_edit=5,
            train_on_equivalents=False, cached=False, value_init="reference", loss_topk="pooled",
            label_smoothing_form="reference", lr_scheduler="plateau", lr_factor=0.5, lr_patience=1,
            lr_threshold=0.05, val_every=25,
            # start_val_epoch=100: its validation after epoch e sees the parameters after e + 1 updates (our step)
            val_start=101, stop_rule="val_loss", early_patience=1, early_threshold=1e-3,
            memory_unit="examples", edit_memory="reference", keep_unfixed=True, retry_neurons=1,
        )
        return cls(**{**values, **overrides})

    def memory_weight(self, task: str) -> float:
        if self.memory_loss_weight is not None:
            return self.memory_loss_weight
        return 5.0 if task == "classification" else 10.0
