#!/usr/bin/env bash
# Run `jft train` on every worker of a Cloud TPU VM pod slice.
#
# Usage:
#   scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE [--project P]
#       [--create --accelerator-type v4-32 [--version tpu-ubuntu2204-base] [--spot]]
#       [--repo URL_OR_PIP_SPEC [--ref GIT_REF] | --skip-install]
#       [--workdir DIR] [--dry-run] -- CONFIG [--config.a.b=value ...]
#
# Steps (each a gcloud command):
#   1. with --create: gcloud compute tpus tpu-vm create NAME (--version defaults to
#      tpu-ubuntu2204-base; v5e and v6e need v2-alpha-tpuv5-lite or v2-alpha-tpuv6e).
#   2. unless --skip-install: on all workers, pip install -U "jax[tpu]" and jft from --repo:
#      a git URL (https://..., or git+...) is installed as git+URL[@REF]; anything else
#      (a directory on the workers, a pip spec such as jft==0.1.0) goes to pip as is.
#   3. when CONFIG is a file here, copy it to the home folder of every worker.
#   4. on all workers: cd ~ && jft train --config CONFIG --workdir DIR --config.a.b=value ...
#      Every worker runs the same command; jft initializes jax.distributed on TPU VMs and
#      JAX finds the other hosts of the slice by itself.
#
# Options:
#   --tpu NAME, --zone ZONE   the TPU VM (required)
#   --project P               Google Cloud project (default: gcloud's configured one)
#   --workdir DIR             run folder on each worker (default: ~/jft-run)
#   --dry-run                 print the gcloud commands ("+ " first) instead of running them
#   -h, --help                print this help
#
# Paths in CONFIG and the overrides (model.path, data.train, ...) are read on the workers.
# For checkpoints that all hosts write to and that outlive the VMs, use a gs:// bucket:
#   --config.train.checkpoint_dir=gs://BUCKET/RUN
#
# Example:
#   scripts/launch_tpu_pod.sh --tpu my-pod --zone us-central2-b --create --accelerator-type v4-32 \
#       --repo https://github.com/ORG/jft --ref main -- configs/lora_llama.py \
#       --config.model.path=/mnt/llama --config.train.checkpoint_dir=gs://my-bucket/lora
set -euo pipefail

die() {
  printf 'error: %s\n' "$1" >&2
  printf "run '%s --help' for usage\n" "$0" >&2
  exit 2
}

# Quote for the remote shell, keeping a leading ~/ so that it expands there.
# shellcheck disable=SC2088
rq() {
  if [[ $1 == "~/"* ]]; then printf '~/%q' "${1#"~/"}"; else printf '%q' "$1"; fi
}

tpu="" zone="" project="" create=0 accel="" version="" spot=0 repo="" ref=""
# shellcheck disable=SC2088  # ~ is expanded by the workers' shell, not here
skip_install=0 workdir="~/jft-run" dry_run=0 seen_dashes=0
while (($#)); do
  arg=$1
  shift
  case $arg in
    --)
      seen_dashes=1
      break
      ;;
    --*=*)
      set -- "${arg#*=}" "$@"
      arg=${arg%%=*}
      ;;
  esac
  case $arg in
    --tpu | --zone | --project | --accelerator-type | --version | --repo | --ref | --workdir)
      if (($# == 0)) || [[ -z $1 || $1 == -* ]]; then die "$arg needs a value, e.g. $arg=VALUE"; fi
      case $arg in
        --tpu) tpu=$1 ;;
        --zone) zone=$1 ;;
        --project) project=$1 ;;
        --accelerator-type) accel=$1 ;;
        --version) version=$1 ;;
        --repo) repo=$1 ;;
        --ref) ref=$1 ;;
        --workdir) workdir=$1 ;;
      esac
      shift
      ;;
    --create) create=1 ;;
    --spot) spot=1 ;;
    --skip-install) skip_install=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
      exit 0
      ;;
    -*) die "unknown flag $arg (CONFIG and its --config.* overrides go after --)" ;;
    *) die "unexpected argument $arg; put CONFIG and its overrides after --" ;;
  esac
done

[[ -n $tpu ]] || die "missing --tpu NAME (the TPU VM to run on)"
[[ -n $zone ]] || die "missing --zone ZONE (the TPU VM's zone, e.g. --zone us-central2-b)"
if ((!seen_dashes || $# == 0)) || [[ $1 == -* ]]; then
  die "no CONFIG: add '-- CONFIG [--config.a.b=value ...]' at the end"
fi
config=$1
shift
for o in "$@"; do
  [[ $o == --config.?*=* ]] || die "after CONFIG only --config.a.b=value overrides may follow, not $o"
done
if ((create)); then
  [[ -n $accel ]] || die "--create needs --accelerator-type TYPE (e.g. v4-32)"
  version=${version:-tpu-ubuntu2204-base}
elif [[ -n $accel || -n $version ]] || ((spot)); then
  die "--accelerator-type, --version and --spot only apply with --create"
fi
spec=""
if ((!skip_install)); then
  [[ -n $repo ]] || die "missing --repo URL_OR_PIP_SPEC (where to pip install jft from), or pass --skip-install"
  case $repo in
    git+*) spec=$repo${ref:+@$ref} ;;
    *://*) spec=git+$repo${ref:+@$ref} ;;
    *)
      [[ -z $ref ]] || die "--ref needs a git URL in --repo, not $repo"
      spec=$repo
      ;;
  esac
elif [[ -n $repo || -n $ref ]]; then
  die "--repo and --ref do nothing with --skip-install; drop one or the other"
fi

if ((!dry_run)) && ! command -v gcloud >/dev/null 2>&1; then
  printf 'error: gcloud not found on PATH; install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install) or use --dry-run\n' >&2
  exit 1
fi

# Print a command ("+ " first, each word quoted); run it too unless --dry-run (then the print is on stderr).
run() {
  local fd=1
  ((dry_run)) || fd=2
  {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  } >&"$fd"
  ((dry_run)) || "$@"
}

where=(--zone="$zone" ${project:+"--project=$project"})
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all)
if ((create)); then
  create_cmd=(gcloud compute tpus tpu-vm create "$tpu" "${where[@]}" --accelerator-type="$accel" --version="$version")
  ((!spot)) || create_cmd+=(--spot)
  run "${create_cmd[@]}"
fi
if ((!skip_install)); then
  run "${ssh[@]}" --command="python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -U $(rq "$spec")"
fi
if [[ -f $config ]]; then
  run gcloud compute tpus tpu-vm scp "$config" "$tpu:${config##*/}" "${where[@]}" --worker=all
  config=${config##*/}
fi
cmd="cd ~ && export PATH=\"\$HOME/.local/bin:\$PATH\" && jft train --config $(rq "$config") --workdir $(rq "$workdir")"
for o in "$@"; do cmd+=" $(rq "$o")"; done
run "${ssh[@]}" --command="$cmd"
