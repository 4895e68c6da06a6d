"""Model folders → typed components on a device (text encoder, denoiser, decoder)."""
