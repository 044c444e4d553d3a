#!/usr/bin/env bash
# The whole reproduction: every experiment (paper tables, ablations, figures), then the tables,
# plots and checks regenerated from results/.
#
#   bash run_all.sh                    # paper profile on a CUDA machine, quick profile otherwise
#   bash run_all.sh --profile quick    # paper | quick | smoke
#   bash run_all.sh --profile quick table2 variance   # only some experiments
#   bash run_all.sh --profile paper --plan            # the schedule over this machine's GPUs and its
#                                                     # GPU-hours (a few steps timed); starts nothing
#
# GPUs: every visible one is used (CUDA_VISIBLE_DEVICES limits them), one run per GPU; CelebA-HQ
# (or every training, with --gpus-per-run K) over several GPUs with torchrun. A training or
# evaluation that fails is reported, the others go on, the tables are still regenerated (the
# failed cells say so) and the exit status is non-zero; run the same command again to retry.
#
# Finished runs and evaluations are skipped, so an interrupted reproduction resumes where it
# stopped: run the same command again. Data: $DDPM_DATA_DIR, ./data, ../shared/data (the first
# that holds each dataset; downloaded into the first when none does); see README.md.
# Extra options for experiments.run (--runs-dir, --results-dir) pass through.
set -euo pipefail
cd "$(dirname "$0")"

profile=""
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --profile=*) profile="${1#*=}"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done

[[ -n "${DDPM_SKIP_INSTALL:-}" ]] || bash scripts/install.sh
PY=${PYTHON:-python3}

if [[ -z "$profile" ]]; then
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        profile=paper
    else
        profile=quick
    fi
    echo "################################################################################"
    echo "# No --profile given: running the '$profile' profile"
    [[ "$profile" == quick ]] && echo "# (no CUDA GPU found: scaled-down runs, about 2 hours on 2 CPU cores;" \
                                       && echo "#  NOT the paper's setting; use a GPU machine for --profile paper)"
    echo "################################################################################"
fi
case "$profile" in paper|quick|smoke) ;; *) echo "unknown profile '$profile': paper | quick | smoke" >&2; exit 2 ;; esac

echo "profile: $profile; data searched in: ${DDPM_DATA_DIR:+\$DDPM_DATA_DIR ($DDPM_DATA_DIR), }./data, ../shared/data" \
     "(a dataset found in none is downloaded into the first; see ddpm/data.py)"

results_dir=results
n_experiments=0
plan=""
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --results-dir) results_dir="${args[$((i + 1))]}"; i=$((i + 1)) ;;
        --all|--list) n_experiments=1 ;;
        --preflight|--no-preflight|--allow-no-is) ;;  # experiments.run's flags without a value
        --plan) plan=1 ;;
        --*=*) ;;
        --*) i=$((i + 1)) ;;  # every other option of experiments.run takes a value
        *) n_experiments=$((n_experiments + 1)) ;;
    esac
done
if [[ $n_experiments -eq 0 ]]; then args+=(--all); fi

# exit status 1: some stage failed (the others ran; their results are reported below); anything
# else (2: a wrong option, 130: Ctrl-C) stops here
status=0
"$PY" -m experiments.run --profile "$profile" "${args[@]}" || status=$?
if [[ -n "$plan" || ( $status -ne 0 && $status -ne 1 ) ]]; then exit $status; fi
if [[ "$profile" != paper ]]; then  # what real images score at this small N (paper: N = 50k, no floor needed)
    "$PY" -m experiments.fid_floor --profile "$profile" --results-dir "$results_dir"
fi
"$PY" -m analysis.report --results-dir "$results_dir" --profile "$profile"
"$PY" -m analysis.claims --results-dir "$results_dir" --profile "$profile"  # C1-C7, each by its rule
"$PY" -m analysis.check --results-dir "$results_dir" --profile "$profile" || status=$((status > 0 ? status : $?))
if [[ $status -ne 0 ]]; then echo "some stages failed (see above): run the same command again to retry them" >&2; fi
exit $status
