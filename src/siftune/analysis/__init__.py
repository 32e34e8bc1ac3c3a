"""Evidence tools for SIFT's premises: gradient quasi-sparsity and loss landscapes.

    from siftune.analysis import GradientArgs, analyze_gradients, LandscapeArgs, analyze_landscape
    analyze_gradients(GradientArgs(model="minilm", dataset="rotten_tomatoes", output_dir="runs/g"))
    analyze_landscape(LandscapeArgs(model="minilm", dataset="rotten_tomatoes", grid=9, output_dir="runs/l"))
    analyze_selection(SelectionArgs(model="minilm", dataset="rotten_tomatoes", density=0.001, output_dir="runs/s"))

Each writes a JSON file, PNG figures and a markdown report, and returns
the JSON's content. The lower-level functions work on any model and
batches (``accumulated_gradient``, ``concentration_report``,
``loss_slice``, ``filter_normalized_direction``), and the statistics in
:mod:`siftune.analysis.stats` on plain tensors and arrays.
"""
from .gradients import GradientArgs, accumulated_gradient, analyze_gradients, concentration_report, targeted_weights
from .inputs import AnalysisArgs
from .landscape import (
    LandscapeArgs,
    analyze_landscape,
    filter_normalized_direction,
    loss_slice,
    perturbed_weights,
    restored,
)
from .selection import SelectionArgs, analyze_selection
from .stats import Concentration, amplitude_1d, amplitude_2d, density_for_share, selection_share

__all__ = [
    "AnalysisArgs", "GradientArgs", "LandscapeArgs", "SelectionArgs", "analyze_gradients", "analyze_landscape",
    "analyze_selection",
    "accumulated_gradient", "concentration_report", "targeted_weights", "filter_normalized_direction",
    "loss_slice", "perturbed_weights", "restored", "Concentration", "selection_share", "density_for_share",
    "amplitude_1d", "amplitude_2d",
]
