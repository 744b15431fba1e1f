"""Pure method logic that actors call and tests check without a model: AGA's background prompts
(`background_prompts`), the label-fidelity rules (`fidelity`), DiffuseMix's image mixing (`diffusemix`),
splitting an image into subject and filled background (`decouple`), GIF's CLIP-guided latent step (`gif`),
MVC's embedding mixing, Algorithm 1 (`mvc_mix`), pasting a subject onto a background (`paste`: AGA's
compositor and De-DA's recombination) and De-DA's composites with their CIP bank (`recombine`).
No Ray, no stage: a function in, a result out."""
