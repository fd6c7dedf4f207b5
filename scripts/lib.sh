# Sourced by every figure script. `parse_args "$@"` splits the script's arguments:
#   model=a[,b]    replaces the script's list of models      setting=a[,b]  replaces its list of settings
#   figures_dir=D  where plots go (default figures/<name>/out)  results_dir=D  read by the plot and passed on
#   anything else  is passed to every Hydra call unchanged (n=16, device=cpu, redo=true, ...)
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

parse_args() {
  read -ra MODELS <<< "$DEFAULT_MODELS"
  read -ra SETTINGS <<< "$DEFAULT_SETTINGS"
  RESULTS_DIR=results
  FIGURES_DIR=""
  EXTRA=()
  for arg in "$@"; do
    case "$arg" in
      model=*) IFS=, read -ra MODELS <<< "${arg#model=}" ;;
      setting=*) IFS=, read -ra SETTINGS <<< "${arg#setting=}" ;;
      figures_dir=*) FIGURES_DIR="${arg#figures_dir=}" ;;
      results_dir=*) RESULTS_DIR="${arg#results_dir=}"; EXTRA+=("$arg") ;;
      *) EXTRA+=("$arg") ;;
    esac
  done
}

# figure_out NAME: the directory a figure's plot writes into
figure_out() { echo "${FIGURES_DIR:-figures/$1/out}"; }

# run_grid MODULE [ARG...]: `python -m MODULE model=M setting=S ARG... EXTRA...` for every model and setting
run_grid() {
  local module=$1; shift
  for model in "${MODELS[@]}"; do
    for setting in "${SETTINGS[@]}"; do
      "$PY" -m "$module" model="$model" setting="$setting" "$@" "${EXTRA[@]}"
    done
  done
}

# plot_figure NAME: redraw figures/NAME from the results into the figure's output directory
plot_figure() { "$PY" "figures/$1/plot.py" --results "$RESULTS_DIR" --out "$(figure_out "$1")"; }
