"""Pure method logic that actors call and tests check without a model: AGA's background prompts
(`background_prompts`), the label-fidelity rules (`fidelity`), DiffuseMix's image mixing (`diffusemix`),
splitting an image into subject and filled background (`decouple`), GIF's CLIP-guided latent step (`gif`).
No Ray, no stage: a function in, a result out."""
