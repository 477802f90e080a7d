namespace PaliGemma.CpuOnly.Model.Synthesis;

/// <summary>
/// Every tensor a PaliGemma (1, or 2 with a Gemma 2 decoder) checkpoint holds for this runtime (the names and shapes <see cref="SigLipVisionTower"/>,
/// <see cref="MultiModalProjector"/> and <see cref="GemmaDecoder"/> require), in Hugging Face state-dict order, each with
/// a distribution that keeps a random model numerically sane.
/// </summary>
/// <remarks>
/// Matrices are N(0, 1/√fan_in), so every projection maps unit-scale inputs to unit-scale outputs. LayerNorm gammas are
/// near 1 and Gemma's RMSNorm weights near 0 (Gemma multiplies by 1 + w). Biases are small. The embedding is N(0, 1/√hidden):
/// times Gemma's √hidden input scale that gives unit-scale inputs, and through the tied LM head logits of about unit scale.
/// </remarks>
public static class PaliGemmaTensorPlan
{
    private static readonly TensorInit SmallBias = new(0f, 0.01f);
    private static readonly TensorInit LayerNormGamma = new(1f, 0.02f);
    private static readonly TensorInit GemmaNormWeight = new(0f, 0.02f);

    public static IReadOnlyList<SyntheticTensor> For(PaliGemmaConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        var tensors = new List<SyntheticTensor>();
        void Add(string name, long[] shape, TensorInit init) => tensors.Add(new SyntheticTensor(name, shape, init));
        void Linear(string prefix, long inFeatures, long outFeatures, bool bias)
        {
            Add(prefix + ".weight", [outFeatures, inFeatures], TensorInit.FanIn(inFeatures));
            if (bias) Add(prefix + ".bias", [outFeatures], SmallBias);
        }

        var v = config.Vision;
        long d = v.HiddenSize, p = v.PatchSize, patches = (long)v.PatchesPerSide * v.PatchesPerSide;
        const string vision = "vision_tower.vision_model.";
        Add(vision + "embeddings.patch_embedding.weight", [d, v.NumChannels, p, p], TensorInit.FanIn(v.NumChannels * p * p));
        Add(vision + "embeddings.patch_embedding.bias", [d], SmallBias);
        Add(vision + "embeddings.position_embedding.weight", [patches, d], TensorInit.FanIn(d));
        for (int i = 0; i < v.NumHiddenLayers; i++)
        {
            string l = $"{vision}encoder.layers.{i}.";
            Linear(l + "self_attn.k_proj", d, d, bias: true);
            Linear(l + "self_attn.v_proj", d, d, bias: true);
            Linear(l + "self_attn.q_proj", d, d, bias: true);
            Linear(l + "self_attn.out_proj", d, d, bias: true);
            Add(l + "layer_norm1.weight", [d], LayerNormGamma);
            Add(l + "layer_norm1.bias", [d], SmallBias);
            Linear(l + "mlp.fc1", d, v.IntermediateSize, bias: true);
            Linear(l + "mlp.fc2", v.IntermediateSize, d, bias: true);
            Add(l + "layer_norm2.weight", [d], LayerNormGamma);
            Add(l + "layer_norm2.bias", [d], SmallBias);
        }
        Add(vision + "post_layernorm.weight", [d], LayerNormGamma);
        Add(vision + "post_layernorm.bias", [d], SmallBias);

        Linear("multi_modal_projector.linear", d, config.ProjectionDim, bias: true);

        var t = config.Text;
        long h = t.HiddenSize, qWidth = (long)t.NumAttentionHeads * t.HeadDim, kvWidth = (long)t.NumKeyValueHeads * t.HeadDim;
        const string text = "language_model.model.";
        Add(text + "embed_tokens.weight", [t.VocabSize, h], TensorInit.FanIn(h));
        for (int i = 0; i < t.NumHiddenLayers; i++)
        {
            string l = $"{text}layers.{i}.";
            Linear(l + "self_attn.q_proj", h, qWidth, t.AttentionBias);
            Linear(l + "self_attn.k_proj", h, kvWidth, t.AttentionBias);
            Linear(l + "self_attn.v_proj", h, kvWidth, t.AttentionBias);
            Linear(l + "self_attn.o_proj", qWidth, h, t.AttentionBias);
            Linear(l + "mlp.gate_proj", h, t.IntermediateSize, bias: false);
            Linear(l + "mlp.up_proj", h, t.IntermediateSize, bias: false);
            Linear(l + "mlp.down_proj", t.IntermediateSize, h, bias: false);
            Add(l + "input_layernorm.weight", [h], GemmaNormWeight);
            Add(l + "post_attention_layernorm.weight", [h], GemmaNormWeight);
            if (t.IsGemma2)
            {
                // Gemma 2 also norms the MLP input and output (post_attention_layernorm then norms the attention output).
                Add(l + "pre_feedforward_layernorm.weight", [h], GemmaNormWeight);
                Add(l + "post_feedforward_layernorm.weight", [h], GemmaNormWeight);
            }
        }
        Add(text + "norm.weight", [h], GemmaNormWeight);
        return tensors;
    }
}
