"""What a person reads: figures (:mod:`.plots`, :mod:`.sweep_plots`, :mod:`.prototype_plots`,
drawn with the shared style of :mod:`.figure_style`; :mod:`.plot_api` returns them to Python),
experiment tracking (:mod:`.tracking`: TensorBoard, MLflow) and the scenario reference generated
from the schema (:mod:`.schema_doc`)."""
