#!/usr/bin/env bash
# The DreamBooth evaluation protocol (Ruiz et al. 2023) on the 30 subjects of
# ../shared/datasets/dreambooth: for each subject, train a delta with the given flags, sample
# its 25 prompts (the live-subject set for cats and dogs, the object set otherwise) 4 times
# each, and score them with `atomtune eval` (DINO, CLIP-I, CLIP-T against the subject's photos).
# Writes OUT/results.md: one row per subject, the overall means, and the flags used.
#
#   scripts/dreambooth-protocol.sh [OPTIONS] [-- TRAIN_FLAGS...]
#
#   --out DIR            where everything goes (default runs/protocol)
#   --model M            base model (default stable-diffusion-v1-5/stable-diffusion-v1-5)
#   --data DIR           the dataset (default ../shared/datasets/dreambooth)
#   --subjects "A B"     only these subjects (default all 30)
#   --prompts N          the first N prompts of each set (default 25)
#   --images N           images per prompt (default 4)
#   --sample-flags "..." extra flags for `atomtune sample` (default: the model's scheduler, 50 steps)
#   --eval-flags "..."   extra flags for `atomtune eval` (e.g. --dino DIR --clip DIR)
#   --tiny               end to end on the tiny fixtures in seconds (2 subjects, 2 prompts,
#                        1 image, 2 training steps; the eval-tiny models): what CI runs
#
# Meant for a GPU with real weights. Resumable: a subject whose eval.json exists is done; one
# interrupted while training resumes from its last checkpoint; an interrupted sampling is redone.
# ATOMTUNE names the binary (default target/release/atomtune, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=runs/protocol
MODEL=stable-diffusion-v1-5/stable-diffusion-v1-5
DATA=../shared/datasets/dreambooth
SUBJECTS=""
NPROMPTS=25
NIMAGES=4
SAMPLE_FLAGS="--steps 50"
EVAL_FLAGS=""
TINY=0
TRAIN_FLAGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --subjects) SUBJECTS=$2; shift 2 ;;
    --prompts) NPROMPTS=$2; shift 2 ;;
    --images) NIMAGES=$2; shift 2 ;;
    --sample-flags) SAMPLE_FLAGS=$2; shift 2 ;;
    --eval-flags) EVAL_FLAGS=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "dreambooth-protocol: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$TINY" = 1 ]; then
  FIX=${ATOMTUNE_SHARED:-../shared}/fixtures
  MODEL=$FIX/tiny-sd15-shape
  SUBJECTS=${SUBJECTS:-"dog backpack"}
  NPROMPTS=2
  NIMAGES=1
  SAMPLE_FLAGS="--steps 2 --width 64 --height 64"
  EVAL_FLAGS="--dino $FIX/eval-tiny/dino-vits-tiny --clip $FIX/eval-tiny/clip-vit-tiny"
  [ ${#TRAIN_FLAGS[@]} -gt 0 ] || TRAIN_FLAGS=(--max-steps 2 --resolution 64)
fi

if [ -z "${ATOMTUNE:-}" ]; then
  ATOMTUNE=target/release/atomtune
  [ -x "$ATOMTUNE" ] || cargo build --release -p atomtune-cli >&2
fi
LIST=$DATA/prompts_and_classes.txt
[ -f "$LIST" ] || { echo "dreambooth-protocol: $LIST not found (--data names the dataset folder)" >&2; exit 1; }

# subject,class rows of the list's "Classes" table
classes() { awk -F, '/^subject_name,class/ {on=1; next} on && NF==2 {print} on && NF!=2 && NR>3 {exit}' "$LIST"; }
# the prompt templates of one set ("Object Prompts" or "Live Subject Prompts"), {0} {1} as
# atomtune's {token} {class}
templates() {
  awk -v set="$1" '$0 == set {on=1; next} on && /^\]/ {exit} on && /^'\''/ {print}' "$LIST" |
    sed -e "s/^'//" -e "s/'\.format.*//" -e 's/{0}/{token}/g' -e 's/{1}/{class}/g' |
    head -n "$NPROMPTS"
}
[ -n "$SUBJECTS" ] || SUBJECTS=$(classes | cut -d, -f1 | tr '\n' ' ')

mkdir -p "$OUT"
{
  echo "model: $MODEL"
  echo "train flags: ${TRAIN_FLAGS[*]:-(defaults)}"
  echo "sample flags: $SAMPLE_FLAGS --num-images $NIMAGES"
  echo "eval flags: ${EVAL_FLAGS:-(defaults)}"
  echo "prompts per subject: $NPROMPTS"
} > "$OUT/flags.txt"

for s in $SUBJECTS; do
  class=$(classes | awk -F, -v s="$s" '$1 == s {print $2}')
  [ -n "$class" ] || { echo "dreambooth-protocol: subject $s is not in $LIST" >&2; exit 1; }
  case "$class" in dog|cat) set_name="Live Subject Prompts" kind=live ;; *) set_name="Object Prompts" kind=object ;; esac
  dir=$OUT/$s
  [ -f "$dir/eval.json" ] && { echo "$s: done before"; continue; }
  mkdir -p "$dir"
  if [ ! -f "$dir/run/delta.safetensors" ]; then
    resume=()
    [ -d "$dir/run/checkpoints" ] && resume=(--resume latest)
    echo "$s: training ($class)"
    "$ATOMTUNE" train --model "$MODEL" --images "$DATA/$s" --token sks --class "$class" \
      --out "$dir/run" --quiet "${resume[@]}" "${TRAIN_FLAGS[@]}"
  fi
  templates "$set_name" > "$dir/prompts.txt"
  rm -rf "$dir/gen"
  echo "$s: sampling $(wc -l < "$dir/prompts.txt") prompts x $NIMAGES"
  # shellcheck disable=SC2086
  "$ATOMTUNE" sample --model "$MODEL" --delta "$dir/run/delta.safetensors" --prompts "$dir/prompts.txt" \
    --num-images "$NIMAGES" --seed 0 --quiet --out "$dir/gen" $SAMPLE_FLAGS
  echo "$s: scoring"
  # shellcheck disable=SC2086
  "$ATOMTUNE" eval --images "$dir/gen" --reference "$DATA/$s" --token sks \
    --json "$dir/eval.json.tmp" $EVAL_FLAGS > "$dir/eval.txt"
  echo "$kind" > "$dir/kind"
  mv "$dir/eval.json.tmp" "$dir/eval.json"
done

# the three top-level means of an eval.json (serde_json's pretty layout: two-space indent)
means() { for k in dino clip_i clip_t; do sed -n "s/^  \"$k\": \([^,]*\),\{0,1\}$/\1/p" "$1"; done | tr '\n' ' '; }
{
  echo "# DreamBooth protocol"
  echo
  sed 's/^/- /' "$OUT/flags.txt"
  echo
  echo "| subject | class | prompts | DINO | CLIP-I | CLIP-T |"
  echo "|---|---|---|---|---|---|"
  for s in $SUBJECTS; do
    class=$(classes | awk -F, -v s="$s" '$1 == s {print $2}')
    read -r d i t <<< "$(means "$OUT/$s/eval.json")"
    printf '| %s | %s | %s | %.3f | %.3f | %.3f |\n' "$s" "$class" "$(cat "$OUT/$s/kind")" "$d" "$i" "$t"
  done
  for s in $SUBJECTS; do means "$OUT/$s/eval.json"; echo; done |
    awk '{d+=$1; i+=$2; t+=$3; n++} END {printf "| **overall** (%d subjects) | | | **%.3f** | **%.3f** | **%.3f** |\n", n, d/n, i/n, t/n}'
} > "$OUT/results.md.tmp"
mv "$OUT/results.md.tmp" "$OUT/results.md"
cat "$OUT/results.md"
