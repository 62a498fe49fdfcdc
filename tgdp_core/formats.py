"""The input format the backbone was built for (CAV-MAE / CAV-MAE Sync; docs/method.md, "Inputs"):
one home for each constant, imported by the config defaults, decoding, `prepare` and AV-Digits.
"""

SAMPLE_RATE = 16_000  # Hz, mono: every wav is resampled to this
FRAME_LENGTH_MS = 25.0  # Kaldi fbank window
FRAME_SHIFT_MS = 10.0  # Kaldi fbank shift: 100 fbank frames per second
# AudioSet fbank statistics (CAV-MAE), also used for VGGSound: fbank is fed as (x - mean) / std.
FBANK_MEAN = -5.081
FBANK_STD = 4.4849
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # frames are normalised with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
