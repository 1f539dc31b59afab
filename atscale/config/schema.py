"""The typed sections of a run's configuration, declared once: data, model, defense, attack, objective, optim,
schedule, eval, dist, perf, log, run. Budgets (``eps``, ``step``) are in 0..255 pixel units here;
:mod:`atscale.config.units` converts them. Loading, overrides and validation are :mod:`atscale.config.load`'s.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# the BN domains (model.bn_domains) each split-BN objective trains (Xie thesis Sec 6.4.2, 7.4.2, 7.5.4)
SPLIT_BN_OBJECTIVES: dict[str, tuple[str, ...]] = {"mbn": ("clean", "adv"), "advprop": ("clean", "adv"),
                                                   "advprop_fg": ("clean", "aug", "adv")}

# the objectives that train a pre-processor against a target (atscale.training.preprocessor_objectives)
PREPROCESSOR_OBJECTIVES = ("jatp", "nrp_static", "hgd", "ape_g", "arn")

# the objectives whose losses are cross-entropies, so they take Mixup / CutMix soft targets
MIXUP_OBJECTIVES = ("madry", "clean", "mixed", "ratio", "alp", "mbn", "advprop")


@dataclass
class MixupCfg:
    """Mixup / CutMix on training batches (timm.data.Mixup; Zhang et al. 2018, Yun et al. 2019), as the modern robust
    ImageNet recipes use (Liu et al. 2023). Off while both alphas are 0. The loss takes the mixed soft targets (with
    objective.label_smoothing); which labels the attack uses is ``attack.mixup_labels``."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # probability of mixing a batch (or element / pair, by mode)
    switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both alphas are > 0
    mode: Literal["batch", "pair", "elem"] = "batch"

    @property
    def on(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


# the keys one data.phases entry may set (AdvXL-style two-stage training, Wang et al. 2024; "fast" progressive resizing)
PHASE_KEYS = ("until_epoch", "image_size", "batch_size", "attack_iters", "attack_eps", "attack_step", "token_drop")


@dataclass
class DataCfg:
    """Where the FFCV dataset lives and how batches are decoded and augmented."""

    source: Literal["digits", "imagefolder", "cifar10"] = "digits"
    root: str = "data/digits"  # folder holding train.beton, val.beton and meta.json
    src: str = ""  # raw source (ImageFolder tree or CIFAR-10 folder) used when the .beton files are built
    build_if_missing: bool = True
    batch_size: int = 128  # per process
    eval_batch_size: int = 256
    image_size: int = 224  # train crop output size
    val_size: int = 224
    val_crop_ratio: float = 0.875  # center crop = val_size / val_crop_ratio resized then cropped (224/256)
    train_crop: Literal["random_resized", "center"] = "random_resized"
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    flip: bool = True
    num_workers: int = 2
    batches_ahead: int = 3  # FFCV decodes this many batches ahead in the background while the GPU computes
    autoaugment: Literal["none", "imagenet", "cifar10", "svhn"] = "none"  # policy on training batches (EfficientNet)
    randaugment_ops: int = 0  # RandAugment on the device batch (Cubuk et al. 2020): ops per image, 0 = off
    randaugment_magnitude: int = 9  # RandAugment magnitude (0..30; the ConvNeXt / Swin recipes use 9)
    mixup: MixupCfg = field(default_factory=MixupCfg)
    # training phases: progressive resizing ("fast" training, Wong et al. 2020) or AdvXL's coarse-to-fine stages
    # (Wang et al. 2024): [{until_epoch: 6, image_size: 128, batch_size: 256, attack_iters: 2}, ...]. Each phase holds
    # until its until_epoch (exclusive); unset keys take the run's values: image_size / batch_size (above),
    # attack_iters / attack_eps / attack_step (attack.*, 0..255 units), token_drop (ViTs: the fraction of patch tokens
    # dropped at random in the optimizer's passes, timm's patch_drop_rate; 0 = all tokens)
    phases: list[dict[str, Any]] = field(default_factory=list)
    max_resolution: int = 0  # when building: longest side cap, 0 = keep
    jpeg_quality: int = 90  # when building imagefolder / cifar10
    digits_size: int = 32  # when building digits: upsampled side
    digits_val_fraction: float = 0.2
    digits_classes: list[int] = field(default_factory=list)  # when building digits: a subset (relabelled), [] = all


@dataclass
class ModelCfg:
    """A timm architecture, with [0, 1] -> mean/std normalization as its first module."""

    arch: str = "resnet50"
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (e.g. channels, stem_width)
    num_classes: int = 0  # 0 = from the dataset's meta.json
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    channels_last: bool = True
    bn_domains: list[str] = field(default_factory=list)  # Mixture BN (Sec 6.4.2): one BN per domain, e.g. [clean, adv]
    eval_domain: str = ""  # the BN domain used for evaluation and kept by export ("" = the first of bn_domains)
    bn_momentum: float = 0.0  # torch convention (TF decay 0.99 = 0.01); 0 = the architecture's default
    # fine-tuning: initial weights of the timm net from an atscale checkpoint (.pt; its EMA weights when kept), a timm
    # folder ("local-dir:DIR" or DIR with model.safetensors) or a .safetensors / .pth state dict; a classifier whose
    # class count differs is re-initialized. A resume takes the checkpoint's weights instead.
    init_from: str = ""
    # parameter-name prefixes (as in model.named_parameters(), e.g. [net.conv1, net.layer1]) whose weights stay fixed;
    # inputs' gradients still flow through them (the attack sees the whole model), BN statistics still update
    freeze: list[str] = field(default_factory=list)


PREPROCESSORS = ("nrp", "hgd_unet", "ape_g", "arn", "adv_transform")


@dataclass
class DefenseCfg:
    """A pre-processing defense P in front of the classifier of ``model.*``: the defended model is
    classifier(P(x)) on [0, 1] images, and every attack (training and evaluation) sees the whole of it. JATP and its
    baselines (Zhou et al., ``zhou-jatp-...``), ARN (Zhou et al. 2021) and the adversarial transformation (Xiao &
    Zheng 2020). ``preprocessor: ""`` = no defense."""

    preprocessor: Literal["", "nrp", "hgd_unet", "ape_g", "arn", "adv_transform"] = ""
    kwargs: dict[str, Any] = field(default_factory=dict)  # P's sizes: NRP channels/growth/blocks, U-Net widths, ...
    # P's initial weights: an export folder of a defended model, or an atscale checkpoint of a defended run
    init_from: str = ""
    # which part the optimizer updates; the other stays fixed in eval mode (JATP: preprocessor; JATP': both;
    # adversarial transformation: classifier). A fixed classifier needs model.init_from (the trained target).
    train: Literal["both", "preprocessor", "classifier"] = "both"
    # adversarial transformation (Xiao & Zheng 2020, Sec 3.2, Eq. 3): least-likely targeted PGD on a fixed f_b
    base_arch: str = "vgg_small"
    base_kwargs: dict[str, Any] = field(default_factory=dict)
    base_from: str = ""  # f_b's weights (atscale checkpoint, export folder, .safetensors); "" = untrained f_b
    delta: float = 51.0  # L-inf range of g in 0..255 units (the paper's 0.2 on [0, 1] pixels)
    iters: int = 13
    step: float = 0.0  # 0..255 units; 0 = delta / 6 (the paper's step)
    seed: int = 0  # g's random starts: stream seed + the call count, so a resumed run draws what an unbroken one would
    # the classifier's module whose feature map JATP's Eq. 5 / 8 compare (HGD: its guiding layer, "" = the logits);
    # a name of model.named_modules() of the timm net, e.g. layer3.1.conv2 for a ResNet-18
    feature_layer: str = ""


@dataclass
class AttackCfg:
    """Training attack. Budgets are in 0..255 pixel units (Feature Denoising, Sec 4.5: eps 16, step 1, 30 iters)."""

    # apgd: APGD-CE (Croce & Hein 2020) with iters steps (Singh et al. 2023 train with 2); its step starts at 2 eps
    # and adapts, so attack.step is unused; targeted / target_mode / clean_start_prob apply as for pgd
    name: Literal["pgd", "apgd", "fgsm", "none"] = "pgd"
    eps: float = 16.0
    step: float = 1.0
    iters: int = 30
    targeted: bool = True
    clean_start_prob: float = 0.2  # per-example probability of starting from the clean image instead of uniform noise
    start_mode: Literal["per_example", "per_batch"] = "per_example"
    target_mode: Literal["random", "least_likely"] = "random"  # targeted: uniform wrong class or the clean argmin
    warmup_epochs: float = 0.0  # the budget grows linearly from 0 over these first epochs
    # what warmup_epochs ramps: eps and step together (Kannan et al.; "fast" training) or the step alone with eps
    # fixed (ARES 2.0 robust_training, Liu et al. 2023: step ramped over the first 5 epochs)
    warmup: Literal["eps_and_step", "step"] = "eps_and_step"
    # dropout / drop-path / patch dropout in the attack's passes: off (False: the deterministic network, like BN's
    # running statistics) or drawn as in the optimizer's passes (True); evaluation attacks always see them off
    stochastic_layers: bool = False
    # with data.mixup: the labels the attack maximizes the loss of: the mixed soft targets (soft, as ARES) or each
    # image's dominant label (hard: argmax of the soft target); targeted attacks draw targets from the hard label
    mixup_labels: Literal["soft", "hard"] = "soft"


@dataclass
class ObjectiveCfg:
    """Training objective (Xie thesis Sec 6.3): madry = 100% adv; mixed = a*J(clean) + (1-a)*J(adv) in shared BNs;
    mbn = the same with separate clean / adv BNs (Sec 6.4.2); advprop = J(clean) + J(adv) with auxiliary adv BNs
    (Chapter 7); advprop_fg = fine-grained AdvProp with one more auxiliary BN for AutoAugment images (Sec 7.5.4).
    mbn and advprop need model.bn_domains: [clean, adv]; advprop_fg [clean, aug, adv] and data.autoaugment.
    Peers: ratio = 100% adv + clean_ratio of the clean images (Sec 6.4.1, Fig 6.1); alp = mixed + alp_weight x logit
    pairing (Kannan et al.); trades (Zhang et al., trades_beta); mart (Wang et al., mart_lambda); free = minibatch
    replay free_replays times (Shafahi et al.). "Fast" training is madry with attack.name fgsm (Wong et al.).
    Pre-processor training (defense.preprocessor; atscale.training.preprocessor_objectives): jatp (Zhou et al., full
    adversarial examples; jatp_alpha, jatp_beta), nrp_static (the same loss on static examples of the target), hgd
    (Liao et al. 2018, representation-guided L1), ape_g (APE-GAN) and arn (Zhou et al. 2021; arn_attacks are its K
    seen attacks, attack.name must be none)."""

    name: Literal["madry", "mixed", "mbn", "advprop", "advprop_fg", "clean", "ratio", "alp", "trades", "mart",
                  "free", "jatp", "nrp_static", "hgd", "ape_g", "arn"] = "madry"
    clean_weight: float = 0.5
    label_smoothing: float = 0.1
    clean_ratio: float = 1.0
    alp_weight: float = 0.5
    trades_beta: float = 6.0
    mart_lambda: float = 6.0
    free_replays: int = 4
    jatp_alpha: float = 5.0  # JATP Eq. 9: weight of the feature-similarity term
    jatp_beta: float = 3.0  # JATP Eq. 10: weight of the pixel loss (mean squared pixel difference of P(x*) and x)
    disc_lr: float = 1.0e-4  # ape_g / arn: Adam lr of the discriminators (ARN Sec 4.1: 1e-4 for all four networks)
    ape_mse_weight: float = 0.7  # APE-GAN: L_G = 0.7 MSE + 0.3 adversarial
    ape_adv_weight: float = 0.3
    arn_lambda1: float = 0.1  # ARN Eq. 7 (MNIST values; CIFAR-10: 100, 10, 100)
    arn_lambda2: float = 0.01
    arn_theta: float = 0.1  # ARN Eq. 8
    # ARN's K seen attacks: suite-style rows {attack, eps (0..255), steps, step, norm}
    arn_attacks: list[dict[str, Any]] = field(default_factory=lambda: [
        {"attack": "pgd", "eps": 8, "steps": 10, "step": 2}])


@dataclass
class OptimCfg:
    """SGD with Nesterov momentum, TF-style RMSProp (EfficientNet / AdvProp, Xie thesis Sec 7.5.1: decay 0.9,
    momentum 0.9), or AdamW (the ConvNeXt / Swin / ViT recipes of the robust ImageNet leaderboard); lr is per
    ``ref_batch`` images and scaled linearly with the global batch (Goyal et al.). Weight decay skips 1-d parameters
    (norms, biases) and the model's own ``no_weight_decay()`` names (position embeddings, tokens) unless
    ``decay_norm_and_bias``; ``layer_decay`` < 1 scales each layer's lr by layer_decay^(depth from the head)
    (fine-tuning, timm's layer groups); ``clip_grad_norm`` > 0 clips the global gradient norm before each step."""

    name: Literal["sgd", "rmsprop_tf", "adamw", "lamb"] = "sgd"
    lr: float = 0.1
    ref_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = False
    rmsprop_decay: float = 0.9  # rmsprop_tf: decay of the squared-gradient average
    rmsprop_eps: float = 1e-3  # rmsprop_tf: epsilon inside the square root, as TensorFlow's
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights; eval and export use it
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw, lamb
    adam_eps: float = 1e-8  # adamw, lamb
    layer_decay: float = 1.0  # < 1: layer-wise lr decay (e.g. 0.65-0.8 when fine-tuning a ViT / ConvNeXt)
    clip_grad_norm: float = 0.0  # > 0: clip the global gradient norm (fp16: of the unscaled gradients)


@dataclass
class ScheduleCfg:
    """Per-iteration learning-rate schedule: linear warmup then step, cosine or exponential decay (exponential:
    x gamma every ``decay_every_epochs``, staircase, as EfficientNet's 0.97 every 2.4 epochs)."""

    epochs: int = 110
    name: Literal["step", "cosine", "exponential", "linear", "constant"] = "step"
    warmup_epochs: float = 5.0
    milestones: list[float] = field(default_factory=lambda: [35.0, 70.0, 95.0])
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    decay_every_epochs: float = 2.4
    bn_eval_last_epochs: int = 0  # BN uses running statistics in the last N epochs (Xie thesis Sec 6.4.3)


@dataclass
class ShiftCfg:
    """Distribution-shift test sets (AdvProp, Xie thesis Sec 7.5.3) evaluated by ``atscale eval``: ImageFolder trees
    whose class folders are named as the training classes, cached as FFCV files."""

    roots: list[str] = field(default_factory=list)
    layouts: list[str] = field(default_factory=list)  # one for all roots or one per root: folder | imagenet-c | ...
    mce_baseline: str = ""  # ImageNet-C normalizer: a YAML/JSON file of errors, or 'alexnet'
    cache: str = ""  # folder of the cached .beton files ("" = <out>/shift_cache)
    max_images: int = 0  # per test set (per corruption and severity), 0 = all
    crop_ratio: float = 0.0  # center-crop ratio, 0 = 1.0 for imagenet-c, else data.val_crop_ratio
    write_mode: Literal["jpg", "raw", "smart"] = "jpg"


@dataclass
class EvalCfg:
    """Evaluation, during training and by ``atscale eval``; one evaluator (:mod:`atscale.evaluation.evaluator`) runs
    every suite with one rule: an image is robust when it is classified correctly clean and attacked.

    The run's suite (``suite: ""``) is clean + PGD-k for each k in ``steps`` at ``eps``; every PGD-k steps by
    max(``step``, eps / k), so k steps can reach the boundary of the budget (the Feature Denoising protocol, Xie thesis
    Sec 4.5: "the 10-step attack uses eps/10 = 1.6"). ``suite`` names another one for the final evaluation (quick, fd,
    robustbench, full, defense, unseen or a YAML file of attack rows). The quick check during training is clean + PGD-``quick_steps``
    of the same budget on the first ``quick_images`` val images."""

    steps: list[int] = field(default_factory=lambda: [10, 100])
    eps: float = 16.0
    step: float = 1.0  # PGD-k steps by max(step, eps / k); 0 = eps / k
    targeted: bool = True
    random_start: bool = True
    max_images: int = 0  # 0 = the whole val set
    # final evaluation: "" = the run's PGD-k list; quick | fd | robustbench | full | defense | path.yaml
    suite: str = ""
    every_epochs: int = 1  # quick clean + PGD check on a val subset during training, 0 = off
    quick_images: int = 512
    quick_steps: int = 10
    early_stop_patience: int = 0  # stop after this many quick checks without a better robust accuracy, 0 = off
    select_best: bool = False  # final eval / export use the weights of the best quick robust accuracy (best.pt)
    seed: int = -1  # attack seed, -1 = run.seed
    bn_domain: str = ""  # Mixture BN models: the BN domain evaluated ("" = model.eval_domain)
    weights: Literal["auto", "raw", "ema"] = "auto"  # auto = the EMA weights when the run kept them
    out: str = ""  # atscale eval's output folder ("" = <run>/eval/<suite>)
    # RobustBench-exact pre-processing (Croce et al. 2021): "ffcv" = the run's val .beton (center crop by
    # data.val_crop_ratio); the others decode the val JPEGs of ``jpeg_root`` with PIL + torchvision as RobustBench does
    preprocess: Literal["ffcv", "Res256Crop224", "BicubicRes256Crop224", "Crop288", "Res224", "none"] = "ffcv"
    jpeg_root: str = ""  # ImageFolder of val JPEGs for a non-ffcv preprocess ("" = data.src's val folder)
    image_list: str = ""  # RobustBench's ImageNet subset file (5000 "class_folder/file.JPEG" lines), "" = all
    shift: ShiftCfg = field(default_factory=ShiftCfg)


@dataclass
class LogCfg:
    tensorboard: bool = True
    progress: bool = True
    every_steps: int = 10


@dataclass
class RunCfg:
    out_dir: str = "runs"
    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto = bf16 on GPU, off on CPU
    threads: int = 0  # torch CPU threads, 0 = torch's default
    resume: str = ""  # "" | auto (the newest checkpoint of this run folder, if any) | path to a checkpoint
    # a resume whose checkpoint was written under other training keys (model, attack, optim, schedule, ...):
    # refuse (naming the keys) or allow (continue with this config's values, logged)
    config_change: Literal["refuse", "allow"] = "refuse"
    ckpt_every_steps: int = 0  # 0 = at the end of every epoch only
    keep_last: int = 2
    max_steps: int = 0  # stop (with a checkpoint) after this many optimizer steps in total, 0 = run to the end
    export: bool = True


@dataclass
class DistCfg:
    """Synchronized SGD: global batch = data.batch_size x world size x grad_accum.

    engine: ddp (DistributedDataParallel) or deepspeed (ZeRO stage ``zero_stage``: 1 partitions optimizer state,
    2 also gradients; bf16/fp16 with fp32 master weights when run.amp asks for it on GPU)."""

    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[1, 2] = 1
    grad_accum: int = 1
    sync_bn: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_min: float = 30.0
    gradient_as_bucket_view: bool = True  # DDP: gradients live in the all-reduce buckets (no copy, less memory)
    bucket_cap_mb: float = 25.0  # DDP all-reduce bucket size


@dataclass
class PerfCfg:
    """Speed and memory switches (the two others are run.amp, bf16 on GPU, and model.channels_last).

    compile: ``torch.compile`` of the model in place (attack and update passes; parameter names unchanged) with this
    mode; ``reduce-overhead`` adds CUDA graphs (static shapes: keep drop_last batches and one image size).
    fused_optimizer: auto = fused SGD kernels on CUDA under DDP, foreach elsewhere (timm's RMSpropTF has no fused
    form).
    activation_checkpointing: recompute each residual block in backward (``atscale.layers.checkpointing``) in the
    optimizer's passes (``update``) or in the attack's passes too (``all``, the larger memory saving): less activation
    memory and a larger batch per GPU for one more block forward per backward.
    cudnn_benchmark / tf32: cuDNN autotuning for the fixed input shapes; TF32 matmuls and convolutions where fp32 is
    left (run.amp=off)."""

    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "off"
    fused_optimizer: Literal["auto", "on", "off"] = "auto"
    activation_checkpointing: Literal["off", "update", "all"] = "off"
    cudnn_benchmark: bool = True
    tf32: bool = True


class Sections:
    """A run config made of dataclass sections with ``run.out_dir`` / ``run.name``: its folder, dict and YAML."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass
class Config(Sections):
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    defense: DefenseCfg = field(default_factory=DefenseCfg)
    attack: AttackCfg = field(default_factory=AttackCfg)
    objective: ObjectiveCfg = field(default_factory=ObjectiveCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    perf: PerfCfg = field(default_factory=PerfCfg)
    log: LogCfg = field(default_factory=LogCfg)
    run: RunCfg = field(default_factory=RunCfg)


