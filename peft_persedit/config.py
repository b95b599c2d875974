"""Configuration of a PERSEDIT adapter: where the edit banks live, how they gate, how edits are made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

from .peft_type import PERSEDIT
from .saving import save_dir_file_atomically

#: model_type → the MLP output projection that edits attach to (suffix matched by peft).
TARGET_MODULES_BY_MODEL_TYPE: dict[str, list[str]] = {
    "llama": ["mlp.down_proj"],
    "mistral": ["mlp.down_proj"],
    "qwen2": ["mlp.down_proj"],
    "qwen3": ["mlp.down_proj"],
    "gemma": ["mlp.down_proj"],
    "gemma2": ["mlp.down_proj"],
    "olmo2": ["mlp.down_proj"],
    "phi3": ["mlp.down_proj"],
    "gpt2": ["mlp.c_proj"],
    "gpt_neox": ["mlp.dense_4h_to_h"],
    "gptj": ["mlp.fc_out"],
}

TRAINABLE_TENSORS = ("A", "B", "keys", "shift")


def default_layers(num_layers: int) -> list[int]:
    """One early-middle layer, where ROME finds subject recall (GPT-J 5/28, Llama 5/32): ⌊0.17 L⌋."""
    return [int(0.17 * num_layers)]


@dataclass
class PersonalizationEditConfig(PeftConfig):
    """Configuration of a :class:`~peft_persedit.PersEditModel`.

    Every edited layer holds, per adapter, a bank of clusters c with unit keys K_c, a threshold τ_c and a
    low-rank delta B_c A_c:  y = W x + Σ_c g_c(x) · (B_c A_c x + shift_c).

    Args:
        target_modules: module names (suffixes) or a regex to wrap; default: the MLP output projection of
            the architecture (``down_proj``, ``c_proj``, ``dense_4h_to_h``, ``fc_out``).
        layers_to_transform: layer indices to edit; default: early-middle layers (see :func:`default_layers`).
        layers_pattern: name of the ``nn.ModuleList`` of decoder blocks when peft cannot guess it.
        gate: ``"hard"`` g = 1[max cos ≥ τ], ``"soft"`` g = σ((max cos − τ)/T), ``"none"`` g ≡ 1 (plain
            ROME/MEMIT deltas; mergeable into W).
        gate_temperature: T of the soft gate.
        trainable: which bank tensors receive gradients (subset of ``A``, ``B``, ``keys``, ``shift``).
        init_clusters / init_rank: clusters created empty-keyed at injection (they always fire, B = 0, so
            the model is unchanged) — a LoRA-like start for training with :class:`transformers.Trainer`.
        init_weights: ``True`` starts the initial clusters as the identity (B = 0); ``False`` draws their A and
            B at random from torch's global generator, so the adapter changes the output from the start (what
            peft's tuners do with ``init_weights=False``; for tests). No effect without ``init_clusters``.
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to wrap (suffixes or regex); default per architecture."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to edit; default: early-middle layers."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the ModuleList of decoder blocks."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never wrapped."})
    gate: Literal["hard", "soft", "none"] = field(default="hard", metadata={"help": "hard | soft | none"})
    gate_temperature: float = field(default=0.02, metadata={"help": "Temperature T of the soft gate."})
    trainable: list[str] = field(
        default_factory=lambda: ["A", "B"],
        metadata={"help": f"Trainable bank tensors, subset of {TRAINABLE_TENSORS}."},
    )
    init_clusters: int = field(default=0, metadata={"help": "Always-on clusters created at injection."})
    init_rank: int = field(default=8, metadata={"help": "Rank of each initial cluster."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: initial clusters have B = 0 (identity start); False: random B (as peft tuners' False)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})
    # editing engine (see peft_persedit.editing); saved with the adapter so edits are reproducible
    key_token: Literal["subject_last", "prompt_last"] = field(
        default="subject_last", metadata={"help": "Token whose layer input is the key (ROME: subject_last)."}
    )
    max_keys_per_cluster: int = field(default=16, metadata={"help": "k-means compresses a cluster to ≤ m keys."})
    value_steps: int = field(default=25, metadata={"help": "Adam steps optimizing v* (batched over preferences)."})
    value_lr: float = field(default=2.0, metadata={
        "help": "Learning rate of the v* optimization (2.0: 1.39× faster edits than 1.0 at the same efficacy, "
                "locality and multiturn@10 on 100 UPQA users; benchmarks/README.md)."})
    kl_weight: float = field(default=0.0625, metadata={"help": "Weight of the KL term on a neutral prompt."})
    value_weight_decay: float = field(default=1e-3, metadata={"help": "L2 penalty on ‖δ‖ / ‖v‖."})
    continuation_tokens: int = field(default=0, metadata={
        "help": "Tokens of the model's own answer after the target whose next-token distributions v* must leave as "
                "they were (KL), so the rest of an edited answer stays fluent; 0 = off (on the embedded model 8 "
                "tokens did not make answers less repetitive and lowered multiturn@10: benchmarks/README.md)."})
    continuation_weight: float = field(default=0.5, metadata={"help": "Weight of that continuation KL."})
    value_rows_per_step: int = field(default=0, metadata={
        "help": "k > 0: most v* steps use only k of a preference's prompts (its question and k − 1 drawn at random), "
                "every 5th step and the last all of them; cheaper steps. 0 = every prompt every step."})
    value_warmup_steps: int = field(default=10, metadata={
        "help": "w > 0: in the first w v* steps a preference fits its literal question and its question after the "
                "longest chat history alone until greedy decoding says its target on both; then every prompt (with "
                "request_templates=2: multiturn@10 0.96 vs 0.90 on 100 UPQA users, 100 preferences edited in 215 s "
                "vs 355 s; benchmarks/README.md). 0: every prompt from the first step."})
    clamp_norm_factor: float = field(default=4.0, metadata={"help": "‖δ‖ ≤ factor · ‖v‖."})
    mom2: Literal["self", "none"] = field(
        default="self", metadata={"help": "Second moment C = E[k kᵀ] from self-generated text, or none."}
    )
    ridge: float = field(default=1e-3, metadata={"help": "ε of the per-cluster solve (relative to tr G / n)."})
    false_fire_rate: float = field(default=1e-3, metadata={"help": "Allowed gate firing rate on neutral text."})
    preserve_leaks: int = field(default=32, metadata={
        "help": "Negative inputs a gate cannot exclude that the cluster's delta must map to 0 (at most, per cluster)."})
    value_questions: int = field(default=1, metadata={"help": "Cluster questions v* is optimized on."})
    value_histories: list[int] = field(default_factory=lambda: [3, 8], metadata={
        "help": "v* is also optimized after this many earlier chat turns (the model's own answers to neutral "
                "prompts), one prompt per entry, so that edits hold deep in a conversation."})
    key_histories: list[int] = field(default_factory=lambda: [2, 5, 10], metadata={
        "help": "Each cluster also gets the key of its question after this many earlier chat turns (the model's own "
                "answers to neutral prompts), one key per entry, so that the gate still fires deep in a chat."})
    request_templates: int = field(default=2, metadata={
        "help": "Requests about the subject from the shipped templates ('What should I buy for my {subject}?', "
                "...) added to each cluster's keys and value prompts, so edits shape advice and product requests."})
    synonyms: int = field(default=4, metadata={"help": "Synonyms asked of the model when none are given."})
    contexts: int = field(default=3, metadata={"help": "Self-generated context prefixes keys average over."})
    bank_sizes: dict[str, list[int]] = field(
        default_factory=dict, metadata={"help": "module → [keys, clusters, rank]; kept in sync, sizes banks on load."}
    )
    preferences: list[dict] = field(
        default_factory=list, metadata={"help": "What this adapter holds: entry k ↔ cluster init_clusters + k."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PERSEDIT
        # the sizes this config was created with (from adapter_config.json when loading); banks are sized from
        # this snapshot, while ``bank_sizes`` follows the live banks and is what gets saved
        self._saved_bank_sizes = {k: list(v) for k, v in self.bank_sizes.items()}
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.gate not in ("hard", "soft", "none"):
            raise ValueError(f"gate must be 'hard', 'soft' or 'none', got {self.gate!r}")
        if self.gate_temperature <= 0:
            raise ValueError(f"gate_temperature must be > 0, got {self.gate_temperature}")
        unknown = set(self.trainable) - set(TRAINABLE_TENSORS)
        if unknown:
            raise ValueError(f"trainable contains unknown tensors {sorted(unknown)}; choose from {TRAINABLE_TENSORS}")
        if self.init_clusters < 0 or self.init_rank < 1:
            raise ValueError(
                f"init_clusters must be ≥ 0 and init_rank ≥ 1, got {self.init_clusters}, {self.init_rank}")
        if not 0 < self.false_fire_rate < 1:
            raise ValueError(f"false_fire_rate must be in (0, 1), got {self.false_fire_rate}")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern is only used together with layers_to_transform")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """peft's config save, committed atomically (temp file + ``os.replace``; see :mod:`.saving`)."""
        save = super().save_pretrained
        save_dir_file_atomically(lambda folder: save(folder, **kwargs), save_directory, CONFIG_NAME)


def saved_bank_sizes(config: PersonalizationEditConfig) -> dict[str, list[int]]:
    """Bank sizes ``config`` was created with (module → [keys, clusters, rank]); empty for a new adapter."""
    return getattr(config, "_saved_bank_sizes", {})
