"""Real bitstreams: the codec, the step-wise latent coder, images, the container."""

from qft.codec.codec import Codec, model_fingerprint
from qft.codec.container import Container
from qft.codec.image import crop, list_images, output_format, pad, read_image, read_rgb, to_tensor, write_image
from qft.codec.latent import HYPERPRIOR_ENTROPY, LatentCoder, QuantizedLatent, RDTarget, target_record
from qft.codec.refine import SGARefine, refine_latents
from qft.codec.steps import STEP_ENTROPY

__all__ = [
    "Codec",
    "Container",
    "HYPERPRIOR_ENTROPY",
    "LatentCoder",
    "QuantizedLatent",
    "RDTarget",
    "SGARefine",
    "STEP_ENTROPY",
    "crop",
    "list_images",
    "model_fingerprint",
    "output_format",
    "pad",
    "read_image",
    "read_rgb",
    "refine_latents",
    "target_record",
    "to_tensor",
    "write_image",
]
