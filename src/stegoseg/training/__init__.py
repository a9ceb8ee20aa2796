"""Training with Lightning: STEGO's module and step-indexed batches (``stego``), DINO
pretraining (``dino``), one Trainer builder (``trainer``), resuming (``resume``), and the
label-free shift calibration and checkpoint criterion (``calibration``, ``selection``)."""
