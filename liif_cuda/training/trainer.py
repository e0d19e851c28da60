"""The LIIF training loop (the original train_liif.py, restated): L1 loss on normalised RGB, Adam (or
SGD), MultiStepLR stepped per epoch, validation PSNR every `epoch_val` epochs, checkpoints in the
original format, one process or many (torchrun + DistributedDataParallel).

Reproducible: the model is initialised from the run seed, the sample order of epoch e is
DistributedSampler's permutation for (seed, e) and every sample draws from its own (seed, e, index)
generator, so N epochs straight equal k epochs, a resume, and N - k epochs.
"""

import csv
import io
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F

from ..models import LIIF, NORMALISATIONS, RDN, EDSRBaseline
from .._files import write_atomically
from ..checkpoints import read_checkpoint
from .checkpointing import (load_original_optimizer_state, load_original_state_dict,
                            make_checkpoint, save_atomically, without_mean_shift)
from .config import ConfigError, TrainingError, check_config, read_yaml
from .datasets import first_k_shortfall, make_dataset

PRECISIONS = ("fp32", "bf16", "fp16")
LOG_COLUMNS = ["epoch", "lr", "train_loss", "val_psnr", "seconds"]
RDN_CONFIGS = {"A": (20, 6, 32), "B": (16, 8, 64)}  # (blocks, layers per block, growth)
BAR_LOSS_EVERY = 20  # steps between the progress bar's loss readings


def fp16_needs_cuda():
    """Why --precision fp16 is refused without CUDA, before any work, by train() and (as a usage
    error) by `liif-cuda train`, and what to use instead on this CPU: bf16 where torch has bf16
    convolutions for it, else fp32 (bf16 would run the encoder's convolutions in plain loops)."""
    from ..upscaling import encoder_runs_in
    instead = "bf16" if encoder_runs_in("bf16", "cpu") == "bf16" else "fp32"
    return f"--precision fp16 needs CUDA (GradScaler); on this CPU use --precision {instead}"


# -- the model and the optimisation ------------------------------------------------------------

def normalisation_of(config):
    """The model's normalisation, which data_norm must spell out: the original format's checkpoints
    are read back (load_model, the original code) with the original (x - 0.5) / 0.5."""
    norm = config.get("data_norm")
    mean, std = NORMALISATIONS["original"]
    expected = {"sub": [mean[0]], "div": [std[0]]}

    def same(part):  # a list of 1 value stands for all 3 channels
        value = (norm or {}).get(part) or {}
        sub, div = value.get("sub", [0.0]), value.get("div", [1.0])
        return (all(s == m for s, m in zip(sub * 3, mean))
                and all(d == v for d, v in zip(div * 3, std)))
    if norm is None:
        flow = f"{{sub: [{mean[0]}], div: [{std[0]}]}}"  # what to write, in YAML
        raise ConfigError(f"data_norm is missing: add data_norm: {{inp: {flow}, gt: {flow}}} (the "
                          f"published configs' normalisation, which checkpoints in the original "
                          f"format imply)")
    if not (same("inp") and same("gt")):
        raise ConfigError(f"data_norm must be inp and gt {expected} (the published configs' "
                          f"normalisation, which checkpoints in the original format imply), got "
                          f"{norm!r}")
    return "original"


def build_model(model_spec, normalisation="original"):
    args = model_spec["args"]
    encoder_spec = args["encoder_spec"]
    eargs = encoder_spec.get("args") or {}
    if encoder_spec["name"] == "edsr-baseline":
        if eargs.get("res_scale", 1) != 1 or eargs.get("rgb_range", 1) != 1:
            raise ConfigError("model.args.encoder_spec.args: edsr-baseline takes res_scale 1 and "
                              "rgb_range 1")
        encoder = EDSRBaseline(n_resblocks=eargs.get("n_resblocks", 16),
                               n_feats=eargs.get("n_feats", 64))
    else:
        config_name = eargs.get("RDNconfig", "B")
        if config_name not in RDN_CONFIGS:
            raise ConfigError(f"model.args.encoder_spec.args.RDNconfig must be A or B, got "
                              f"{config_name!r}")
        blocks, layers, growth = RDN_CONFIGS[config_name]
        encoder = RDN(g0=eargs.get("G0", 64), n_blocks=blocks, n_layers=layers, growth=growth,
                      kernel_size=eargs.get("RDNkSize", 3))
    imnet = args["imnet_spec"]["args"]
    return LIIF(encoder, hidden_list=imnet["hidden_list"], out_dim=imnet["out_dim"],
                local_ensemble=args.get("local_ensemble", True),
                feat_unfold=args.get("feat_unfold", True),
                cell_decode=args.get("cell_decode", True), normalisation=normalisation)


def _first_mismatch(model_state, checkpoint_state):
    """The first key or shape in which a checkpoint's state dict differs from the model's, or None
    (torch's load_state_dict error lists them only after a first line that says nothing)."""
    for key, value in model_state.items():
        if key not in checkpoint_state:
            return f"{key}: not in the checkpoint"
        if checkpoint_state[key].shape != value.shape:
            return (f"{key}: {tuple(checkpoint_state[key].shape)} in the checkpoint, "
                    f"{tuple(value.shape)} in the config's model")
    for key in checkpoint_state:
        if key not in model_state:
            return f"{key}: in the checkpoint, not in the config's model"
    return None


def build_optimizer(spec, parameters):
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[spec["name"]]
    args = dict(spec.get("args") or {})
    if not isinstance(args.get("lr"), (int, float)) or isinstance(args.get("lr"), bool):
        raise ConfigError(f"optimizer.args.lr must be a number, got {args.get('lr')!r} (in YAML "
                          f"write 1.e-4, not 1e-4, which PyYAML reads as a string)")
    return cls(parameters, **args)


def autocast(device_type, precision):
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else
                          torch.float16)


def train_step(model, optimizer, batch, precision="fp32", scaler=None):
    """One optimisation step on a batch whose inp and gt are already normalised; returns the loss
    (a float tensor, detached)."""
    with autocast(batch["inp"].device.type, precision):
        pred = model(batch["inp"], batch["coord"], batch["cell"])
        loss = F.l1_loss(pred.float(), batch["gt"])
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def normalise_batch(batch, device, normalisation="original"):
    mean, std = (torch.tensor(v, device=device) for v in NORMALISATIONS[normalisation])
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["inp"] = (batch["inp"] - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    batch["gt"] = (batch["gt"] - mean) / std
    return batch


@torch.no_grad()
def batch_psnrs(model, loader, device, precision, chunk, normalisation="original"):
    """(size, PSNR on [0, 1] colours) of each batch, in the loader's order."""
    model.eval()
    mean, std = (torch.tensor(v, device=device) for v in NORMALISATIONS[normalisation])
    values = []
    for raw in loader:
        batch = normalise_batch(raw, device, normalisation)
        with autocast(device.type, precision):
            model.gen_feat(batch["inp"])
            preds = [model.query_rgb(batch["coord"][:, i:i + chunk], batch["cell"][:, i:i + chunk])
                     for i in range(0, batch["coord"].shape[1], chunk)]
        pred = (torch.cat(preds, 1).float() * std + mean).clamp(0, 1)
        mse = (pred - raw["gt"].to(device)).pow(2).mean()
        values.append((raw["gt"].shape[0], -10 * math.log10(max(mse.item(), 1e-12))))
    model.train()
    return values


def size_weighted_mean(values):
    """The original's validation: its Averager adds each batch's PSNR with the batch's size."""
    total, samples = 0.0, 0
    for size, psnr in values:
        total += size * psnr
        samples += size
    return total / samples


def validate(model, loader, device, precision, chunk, normalisation="original"):
    """Each batch's PSNR on [0, 1] colours, averaged with the batches' sizes as weights."""
    return size_weighted_mean(batch_psnrs(model, loader, device, precision, chunk, normalisation))


def validate_shared(model, val_set, batch_size, dist, device, precision, chunk, normalisation,
                    loader_args):
    """validate() with the batches shared among the processes: batch j (samples j * batch_size ..)
    is validated by rank j % world, and the weighted mean is taken over all batches in order, so
    the result is one process's (the batches are the same, only spread). Every rank works: where
    rank 0 validated alone, the others waited in a barrier whose timeout (30 minutes with gloo,
    10 with NCCL) a long validation could reach."""
    sampler = torch.utils.data.BatchSampler(range(len(val_set)), batch_size, drop_last=False)
    batches = list(sampler)
    mine = list(range(dist.rank, len(batches), dist.world))
    loader = torch.utils.data.DataLoader(val_set, batch_sampler=[batches[j] for j in mine],
                                         **loader_args)
    sizes, psnrs = [0.0] * len(batches), [0.0] * len(batches)
    for j, (size, psnr) in zip(mine, batch_psnrs(model, loader, device, precision, chunk,
                                                 normalisation)):
        sizes[j], psnrs[j] = float(size), psnr
    # Each batch's values come from one rank and zeros from the others: the sums are exact.
    values = dist.sum(sizes + psnrs, device)
    return size_weighted_mean(zip((int(v) for v in values[:len(batches)]), values[len(batches):]))


def restore_random_state(extra, source, device):
    """Puts back the random states make_checkpoint saved: torch's, and on CUDA the state of this
    process's GPU (its index in the saved list) alone: setting every GPU's would open a context on
    each from every process. The results draw nothing from them (the samples have their own
    generators), but each DataLoader iterator draws its base seed from torch's, so that without
    them a resumed run's generator was not the straight run's."""
    try:
        if extra.get("torch_rng") is not None:
            torch.set_rng_state(extra["torch_rng"])
        cuda = extra.get("cuda_rng") or []
        if device.type == "cuda" and device.index is not None and device.index < len(cuda):
            torch.cuda.set_rng_state(cuda[device.index], device)
    except (TypeError, RuntimeError) as exc:
        raise ConfigError(f"{source}: its saved random state cannot be restored "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                          ) from None


# -- processes ---------------------------------------------------------------------------------

def torchrun_place():
    """(rank, world size, local rank) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK; (0, 1, 0)
    outside it. Checked before anything else: int() says nothing of which variable is wrong, a
    WORLD_SIZE of 0 divides by zero, and a RANK outside the world waits in init_process_group for
    the 30 minutes of its timeout."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    values = [os.environ.get(name, default) for name, default in zip(names, ("0", "1", "0"))]
    try:
        rank, world, local_rank = (int(v) for v in values)
    except ValueError:
        raise TrainingError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets "
                            f"them), got {', '.join(f'{n}={v!r}' for n, v in zip(names, values))}"
                            ) from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise TrainingError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}: need "
                            f"0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0 (as torchrun sets them)")
    return rank, world, local_rank


class Distributed:
    """The process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""

    def __init__(self, device):
        """`device`: "cpu", "cuda" (this process's: cuda:LOCAL_RANK) or "cuda:N" (one process
        only: train refuses it under torchrun); the device taken is self.device."""
        self.rank, self.world, self.local_rank = torchrun_place()
        self.enabled = self.world > 1
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if self.device.index is None:
                if self.local_rank >= torch.cuda.device_count():
                    # Else torch's "invalid device ordinal", which names neither the rank nor
                    # the count.
                    raise TrainingError(f"LOCAL_RANK={self.local_rank}, but this process sees "
                                        f"{torch.cuda.device_count()} CUDA GPU(s)")
                self.device = torch.device("cuda", self.local_rank)
            # The current device, for what names none: NCCL's communicator, the DataLoader's
            # pin-memory thread, a bare torch.cuda call.
            torch.cuda.set_device(self.device)
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values, device):
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            # Gloo's worker threads let go of the last collectives' tensors (Python objects, so
            # with the GIL) just after the waits for them returned. Were the interpreter exiting by
            # then, a process whose run has finished would abort ("terminate called without an
            # active exception", status -6, and torchrun reports the run failed): about 1 run in
            # 10 of two CPU processes with torch 2.13. A pause without the GIL lets them finish.
            time.sleep(0.05)
            torch.distributed.destroy_process_group()


# -- the run folder ------------------------------------------------------------------------------

LOCK_NAME = ".lock"


def lock_run_folder(out_dir):
    """Takes the run folder's lock, which the process that writes the folder (rank 0) holds for the
    whole run: a second training into the same folder is refused instead of mixing its files with
    this one's. An flock, released when the process dies, so never stale. Makes the folder (and its
    missing parents) if need be; returns (the lock's fd, the folders made, innermost first)."""
    import fcntl
    made, folder = [], os.path.abspath(out_dir)
    while not os.path.isdir(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        remove_made_folders(made)  # a run that cannot start leaves nothing behind
        raise TrainingError(f"--out {out_dir}: cannot write there ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise TrainingError(f"{out_dir} is in use by another training"
                            + (f" (pid {holder})" if holder.isdigit() else "")) from None
    except OSError as exc:
        # A file system without locks (some network ones: ENOLCK): the run goes on unguarded
        # rather than not at all.
        print(f"note: cannot lock {out_dir} ({exc.strerror or exc}); a second training into it "
              f"would not be refused", flush=True)
    os.ftruncate(fd, 0)  # the holder's pid, for the message above
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd, made


def remove_made_folders(made):
    """Removes the folders a run made (innermost first) while they are empty."""
    for folder in made:
        try:
            os.rmdir(folder)
        except OSError:  # something else appeared in it: leave it and those above
            return


def unlock_run_folder(out_dir, fd, made, failed):
    """Releases the lock; after a failed setup, removes the folders this run made if they hold
    nothing but the lock file (a run that cannot start leaves nothing behind)."""
    try:
        if failed and made and os.listdir(out_dir) == [LOCK_NAME]:
            os.remove(os.path.join(out_dir, LOCK_NAME))
            remove_made_folders(made)
    except OSError:
        pass  # the lock file or the folder went meanwhile: leave the rest
    finally:
        os.close(fd)


def existing_checkpoints(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return sorted(f for f in os.listdir(out_dir) if f.startswith("epoch-") and f.endswith(".pth"))


def read_log(path, up_to_epoch):
    """The log rows of epochs <= up_to_epoch (a resumed run rewrites the later ones)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["epoch"]) <= up_to_epoch]


def write_log(path, rows):
    def write(f):
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    write_atomically(path, write, binary=False)


def write_config(config, out_dir):
    """The run's config as out_dir/config.yaml, unless that file already holds this config (as
    read and checked): then it stays as it is, so that a config written there by hand and passed
    as --config keeps its comments and layout."""
    import yaml
    path = os.path.join(out_dir, "config.yaml")
    try:
        with open(path) as f:
            if check_config(read_yaml(f, path)) == config:
                return
    except (OSError, ValueError):  # none there, unreadable or no config (ConfigError): replaced
        pass
    write_atomically(path, lambda f: yaml.safe_dump(config, f, sort_keys=False), binary=False)


_UNSET = object()


def config_differences(old, new, prefix=""):
    """["dotted.key old -> new", ...] between two configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [d for k in keys for d in config_differences(old.get(k, _UNSET),
                                                              new.get(k, _UNSET), f"{prefix}{k}.")]
    if old is not _UNSET and new is not _UNSET and type(old) is type(new) and old == new:
        return []
    old, new = ("(unset)" if v is _UNSET else repr(v) for v in (old, new))
    return [f"{prefix[:-1]} {old} -> {new}"]


def keep_changed_config(config, out_dir, epoch):
    """On --resume: the run's config.yaml is about to be replaced by the new config; where they
    differ, say so and keep the previous one as config-before-epoch-EPOCH.yaml, so that the run
    folder still describes every epoch. Returns that file's name, or None."""
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    try:
        old = read_yaml(io.StringIO(text), path)
    except ConfigError:
        old = None
    changes = config_differences(old, config) if isinstance(old, dict) else \
        [f"{path} is not a config"]
    if not changes:
        return None
    kept = f"config-before-epoch-{epoch}.yaml"
    write_atomically(os.path.join(out_dir, kept), lambda f: f.write(text), binary=False)
    print(f"note: the config differs from the run's ({', '.join(changes)}); the optimizer state "
          f"and learning rate come from the checkpoint, not from the config; the previous config "
          f"is kept as {kept}", flush=True)
    return kept


def _from_worker(exc):
    """An error raised in a DataLoader worker comes back as "Caught X in DataLoader worker process
    N." followed by the worker's traceback, whose last line holds the message (the CLI prints the
    first line): the error with that message alone."""
    text = str(exc)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return exc
    last = text.rstrip().splitlines()[-1]
    return type(exc)(last.split(": ", 1)[1] if ": " in last else last)


# -- the loop ------------------------------------------------------------------------------------

def gpu_visible():
    return torch.cuda.is_available()


def train(config, out_dir, resume=False, init=None, device=None, precision="fp32", workers=None,
          progress=True):
    """Trains the model of a checked config (liif_cuda.training.load_config) into `out_dir`.

    Args:
        resume: continue from out_dir/epoch-last.pth. Without it, an out_dir that holds checkpoints
            is refused (TrainingError) and nothing in it is touched.
        init: start from a pretrained model: a name ("edsr-baseline-liif") or a checkpoint path
            (any layout load_model reads); its architecture must be the config's.
        device: "cpu", "cuda" or "cuda:N" (default: CUDA where a GPU is visible and liif_cuda
            has its CUDA kernels, else the CPU, with a note if a GPU is visible); under torchrun
            each process takes cuda:LOCAL_RANK ("cuda"), and "cuda:N" is refused (TrainingError).
        precision: "fp32", "bf16" (autocast on the CPU or CUDA) or "fp16" (CUDA autocast with a
            GradScaler).
        workers: DataLoader worker processes (default: 4 on CUDA, 0 on the CPU, where they would
            compete with the computation for the cores).
        progress: a tqdm bar per epoch (loss, iterations per second); a line per epoch is printed
            either way.
    Returns the path of the last checkpoint (None in the processes of rank > 0).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device is None:
        # As upscale and eval choose: CUDA where a GPU is visible and liif_cuda has its CUDA kernels.
        from ..upscaling import default_device
        device = default_device()
        if device == "cpu" and gpu_visible() and os.environ.get("RANK", "0") == "0":
            print("note: a GPU is visible, but this liif_cuda was built without its CUDA kernels: "
                  "training on the CPU (docs/install.md says how to build them)", flush=True)
    device = str(device)
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's "Invalid device string"
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    device_type = dev.type
    if device_type == "cuda":
        from ..load import check_device
        try:  # no GPU, a CPU build of torch, liif_cuda built without its CUDA kernels, no GPU N
            check_device(device)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(fp16_needs_cuda())
    check_config(config)  # a config built in Python, not by load_config, is checked all the same
    if "eval_type" in config:
        raise ConfigError("eval_type: liif-cuda train validates on val_dataset's samples as the "
                          "published training configs do; use `liif-cuda eval` for the benchmark "
                          "protocols")
    normalisation = normalisation_of(config)
    if not os.fspath(out_dir):
        raise ValueError("--out must name a folder")
    if resume and init is not None:
        raise ValueError("--init and --resume exclude each other")
    if not resume and config.get("resume") is not None and not os.path.isfile(config["resume"]):
        raise ConfigError(f"resume: {config['resume']} does not exist")
    # os.makedirs would fail on a file in the way ("File exists").
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise TrainingError(f"--out {out_dir} is not a folder ({existing} is a file)")
    # Bad torchrun variables: an error before the run folder is made.
    rank, world, _ = torchrun_place()
    if world > 1 and device_type == "cuda" and dev.index is not None:
        # Every process on GPU N: NCCL refuses two ranks on one GPU (or they would share it).
        raise TrainingError(f"device {device!r}: under torchrun (WORLD_SIZE={world}) each process "
                            f"takes cuda:LOCAL_RANK; pass 'cuda'")
    # Before the checkpoints are looked at: another training could write them at any time.
    lock = lock_run_folder(out_dir) if rank == 0 else None
    failed = True
    try:
        ckpts = existing_checkpoints(out_dir)
        if resume and "epoch-last.pth" not in ckpts:
            # A run stopped before its first epoch ended leaves its config and nothing to resume.
            started = os.path.isfile(os.path.join(out_dir, "config.yaml"))
            raise TrainingError(f"--resume: {os.path.join(out_dir, 'epoch-last.pth')} does not "
                                f"exist" + ("; the run there stopped before its first epoch "
                                            "ended: start it again without --resume"
                                            if started else ""))
        if not resume and ckpts:
            shown = ", ".join(ckpts[:3]) + (f" and {len(ckpts) - 3} more" if len(ckpts) > 3 else "")
            raise TrainingError(f"{out_dir} already holds checkpoints ({shown}); "
                                f"pass --resume to continue that run or choose another folder")
        dist = Distributed(device)
        try:
            path = _train(config, out_dir, resume, init, dist, device_type, precision, workers,
                          progress, normalisation)
        except (ConfigError, TrainingError) as exc:
            unwrapped = _from_worker(exc)
            if unwrapped is exc:
                raise
            raise unwrapped from None
        finally:
            dist.close()
        failed = False
        return path
    finally:
        if lock is not None:
            unlock_run_folder(out_dir, *lock, failed)


def _train(config, out_dir, resume, init, dist, device_type, precision, workers, progress,
           normalisation):
    device = dist.device
    if dist.main and precision == "bf16":
        from ..upscaling import encoder_runs_in
        if encoder_runs_in(precision, device_type) == "fp32":
            # The condition of inference's float32 fallback; training goes on as asked (its
            # precision is recorded in its checkpoints), but never silently at a fraction of
            # float32's speed.
            print("note: --precision bf16 on this CPU: torch has no bf16 convolutions for it "
                  "(they need AVX512 or AMX), so the encoder's convolutions run in plain loops "
                  "and a step takes several times float32's (7.9x on a 2-core AVX2 AMD EPYC); "
                  "--precision fp32 is faster here", flush=True)
    seed = config.get("seed", 0)
    torch.manual_seed(seed)
    model = build_model(config["model"], normalisation).to(device)
    if init is not None:
        from ..load import load_model
        try:
            init_model = load_model(init)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"--init {init}: {(str(exc).splitlines() or [repr(exc)])[0]}"
                              ) from None
        pretrained = init_model.state_dict()
        mismatch = _first_mismatch(model.state_dict(), pretrained)
        if mismatch is not None:
            raise ConfigError(f"--init {init}: the checkpoint's model does not match the config's "
                              f"model ({mismatch})")
        model.load_state_dict(pretrained, strict=True)
        if (NORMALISATIONS[init_model.normalisation] != NORMALISATIONS[normalisation]
                and dist.main):  # by value: mmediting's RDN has the original's
            # Not an error (fine-tuning adapts the weights), but never silent: the weights learnt
            # other input and output scales, and the border pixels keep that from being folded
            # into the first convolution exactly.
            (mean, std), (to_mean, to_std) = (NORMALISATIONS[init_model.normalisation],
                                              NORMALISATIONS[normalisation])
            print(f"note: --init {init} was trained with the {init_model.normalisation} "
                  f"normalisation (mean {list(mean)}, std {list(std)}); training uses the "
                  f"{normalisation} one (mean {list(to_mean)}, std {list(to_std)}), so the first "
                  f"steps start from a model that sees its inputs and outputs on other scales",
                  flush=True)
    optimizer = build_optimizer(config["optimizer"], model.parameters())
    steps = config.get("multi_step_lr")
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, **steps) if steps else None
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    start_epoch, best = 1, -math.inf
    resume_from = os.path.join(out_dir, "epoch-last.pth") if resume else config.get("resume")
    if resume_from is not None:
        which = "--resume" if resume else "resume:"
        state = read_checkpoint(resume_from)
        if not (isinstance(state, dict) and isinstance(state.get("model"), dict)
                and "sd" in state["model"] and "optimizer" in state and "epoch" in state):
            raise ConfigError(f"{which} {resume_from} is not a training checkpoint (the original "
                              f"format's model, optimizer and epoch)")
        mismatch = _first_mismatch(model.state_dict(), without_mean_shift(state["model"]["sd"]))
        if mismatch is not None:
            raise ConfigError(f"{which} {resume_from}: the checkpoint's model does not match the "
                              f"config's model ({mismatch})")
        load_original_state_dict(model, state["model"]["sd"])
        try:
            load_original_optimizer_state(model, optimizer, state["optimizer"]["sd"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{which} {resume_from}: its optimizer state does not fit the "
                              f"config's optimizer ({exc})") from exc
        extra = state.get("liif_cuda") or {}
        if scheduler is not None:
            if extra.get("scheduler") is not None:
                scheduler.load_state_dict(extra["scheduler"])
            else:
                # An original checkpoint: no scheduler state. Step the scheduler to its epoch from
                # the initial rate (the optimizer's saved rate has the milestones passed already, and
                # stepping from it would apply them twice).
                for group in optimizer.param_groups:
                    group["lr"] = group.get("initial_lr", group["lr"])
                with warnings.catch_warnings():  # "step() before optimizer.step()": on purpose
                    warnings.simplefilter("ignore", UserWarning)
                    for _ in range(state["epoch"]):
                        scheduler.step()
        if scaler is not None and extra.get("scaler") is not None:
            scaler.load_state_dict(extra["scaler"])
        if extra.get("best_val_psnr") is not None:
            best = extra["best_val_psnr"]
        restore_random_state(extra, f"{which} {resume_from}", device)
        start_epoch = state["epoch"] + 1
        if dist.main:
            print(f"resuming from {resume_from}, after epoch {state['epoch']} of "
                  f"{config['epoch_max']}"
                  + ("; nothing left to train (raise epoch_max to go on)"
                     if start_epoch > config["epoch_max"] else ""), flush=True)
            saved = extra.get("precision")
            if saved is not None and saved != precision:
                # Not an error (changing precision mid-run can be intended), but never silent.
                print(f"note: the run was saved with --precision {saved}; it goes on with "
                      f"--precision {precision} (pass --precision {saved} to keep it)", flush=True)

    train_spec = config["train_dataset"]
    batch_size = train_spec["batch_size"]
    if batch_size % dist.world:
        raise ConfigError(f"train_dataset.batch_size {batch_size} (the global batch) must be a "
                          f"multiple of the {dist.world} processes")
    train_set = make_dataset(train_spec, seed)
    # drop_last: the sampler's default pads the permutation with its first samples up to a
    # multiple of the processes, which adds a step (repeated samples) to an epoch whose partial
    # last batch one process drops. Dropping up to WORLD_SIZE - 1 samples from the end instead
    # leaves every full global batch, so N processes take the single process's steps.
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world,
                                                  rank=dist.rank, shuffle=True, seed=seed,
                                                  drop_last=True)
    workers = (4 if device_type == "cuda" else 0) if workers is None else workers
    loader_args = dict(num_workers=workers, pin_memory=device_type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size // dist.world,
                                               sampler=sampler, drop_last=True, **loader_args)
    if len(train_loader) == 0:
        raise ConfigError(f"train_dataset: {len(train_set)} samples make no batch of "
                          f"{batch_size} (raise repeat or lower batch_size)")
    val_set = None
    if config.get("val_dataset") is not None:
        val_set = make_dataset(config["val_dataset"], seed + 1, "val_dataset")  # the same samples
    for where, dataset in (("train_dataset", train_set), ("val_dataset", val_set)):
        shortfall = dataset is not None and first_k_shortfall(config[where], dataset, where)
        if shortfall and dist.main:
            print(f"note: {shortfall}", flush=True)

    train_model = model
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device_type == "cuda" else None)

    # The run folder's files only once the data and the model are known to be good: a run that
    # cannot start leaves nothing behind (rank 0 made the folder for its lock, and removes it).
    if dist.main:
        os.makedirs(out_dir, exist_ok=True)
        if resume:
            keep_changed_config(config, out_dir, start_epoch)
        write_config(config, out_dir)
    dist.barrier()

    log_path = os.path.join(out_dir, "log.csv")
    rows = read_log(log_path, start_epoch - 1) if dist.main else []
    epoch_max, epoch_val = config["epoch_max"], config.get("epoch_val")
    epoch_save = config.get("epoch_save")
    last_path = os.path.join(out_dir, "epoch-last.pth")
    for epoch in range(start_epoch, epoch_max + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        bar = None
        if progress and dist.main:
            from tqdm import tqdm
            bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}/{epoch_max}", unit="it",
                       leave=False)
        # The losses add up on the device: reading one back each step would make a GPU wait.
        loss_sum, count = torch.zeros((), dtype=torch.float64, device=device), 0
        model.train()
        for raw in train_loader:
            batch = normalise_batch(raw, device, normalisation)
            loss = train_step(train_model, optimizer, batch, precision, scaler)
            loss_sum += loss.double()
            count += 1
            if bar is not None:
                if count % BAR_LOSS_EVERY == 1 or count == len(train_loader):
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        if scheduler is not None:
            scheduler.step()
        loss_sum, count = dist.sum([loss_sum.item(), count], device)
        val_psnr = None
        if val_set is not None and epoch_val and epoch % epoch_val == 0:
            val_psnr = validate_shared(model, val_set, config["val_dataset"]["batch_size"], dist,
                                       device, precision, config.get("eval_bsize") or 30000,
                                       normalisation, loader_args)
        if dist.main:
            # One measure for log.csv and the printed line: training and validation, not saving.
            seconds = time.perf_counter() - started
            improved = val_psnr is not None and val_psnr > best
            best = val_psnr if improved else best
            rows.append({"epoch": epoch, "lr": lr, "train_loss": loss_sum / count,
                         "val_psnr": "" if val_psnr is None else f"{val_psnr:.4f}",
                         "seconds": f"{seconds:.2f}"})
            # The log first: a run stopped before the checkpoint below resumes from the previous
            # one and rewrites this row.
            write_log(log_path, rows)
            checkpoint = make_checkpoint(model, config["model"], optimizer, config["optimizer"],
                                         scheduler, scaler, epoch,
                                         None if best == -math.inf else best, seed, precision)
            save_atomically(checkpoint, last_path)
            if epoch_save and epoch % epoch_save == 0:
                save_atomically(checkpoint, os.path.join(out_dir, f"epoch-{epoch}.pth"))
            if improved:
                save_atomically(checkpoint, os.path.join(out_dir, "epoch-best.pth"))
            summary = f"epoch {epoch}/{epoch_max}: loss {loss_sum / count:.4f}, lr {lr:g}"
            if val_psnr is not None:
                summary += f", val PSNR {val_psnr:.2f} dB"
            print(f"{summary}, {seconds:.1f} s", flush=True)
        dist.barrier()
    if not dist.main:
        return None
    # Nothing left to train after a config's `resume: PATH`: no checkpoint was written here.
    return last_path if start_epoch <= epoch_max else resume_from
