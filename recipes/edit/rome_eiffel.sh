#!/usr/bin/env bash
# Trace a fact, pick the edit layer from the trace, edit it with ROME, ship the delta in checkpoints/
# with its manifest entry, and apply it at inference:
#   bash recipes/edit/rome_eiffel.sh            (after recipes/install.sh; about 5 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
LESION=${LESION:-.venv/bin/lesion}
# 1. the full causal trace of the fact, for the record (runs/eiffel/heatmap.png)
$LESION --threads 2 run recipes/trace/trace_eiffel.yaml --out runs/eiffel --quiet
# 2-4. `layer: auto` traces the MLP at the subject, picks the layer, edits, evaluates, and ships the delta
$LESION --threads 2 run recipes/edit/edit_eiffel.yaml --out runs/edit --checkpoint rome_eiffel_to_rome_smollm2
# 5. apply the shipped delta (verified against the base model) and generate with and without it
$LESION apply --delta checkpoints/rome_eiffel_to_rome_smollm2.safetensors \
  --prompt "The Eiffel Tower is located in the city of" \
  --prompt "Where is the Eiffel Tower? It is in the city of" \
  --prompt "The Louvre is located in the city of"
