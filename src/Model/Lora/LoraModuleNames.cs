namespace PaliGemma.CpuOnly.Model.Lora;

/// <summary>How module paths are spelled in an adapter's tensor names.</summary>
public enum LoraNameLayout
{
    /// <summary>transformers &lt;= 4.51 (the hub checkpoint names): <c>language_model.model.layers.N...</c>, <c>vision_tower...</c>.</summary>
    Classic,
    /// <summary>transformers &gt;= 4.52: <c>model.language_model.layers.N...</c>, <c>model.vision_tower...</c>, <c>lm_head</c>.</summary>
    Restructured,
}

/// <summary>What a module of PaliGemma is, as far as LoRA cares.</summary>
internal enum ModuleKind
{
    /// <summary>A dense layer this runtime can adapt.</summary>
    Linear,
    /// <summary>The LM head (a Linear in transformers, tied to embed_tokens).</summary>
    LmHead,
    Embedding,
    Conv2d,
    /// <summary>Norms, activations, rotary embeddings and containers: nothing LoRA can adapt.</summary>
    Other,
}

/// <summary>The module tree of a loaded PaliGemma in both name layouts, with the mapping between them.</summary>
internal sealed class LoraModuleNames
{
    private readonly List<(string Classic, ModuleKind Kind)> _modules = [];
    private readonly Dictionary<string, ModuleKind> _kindByClassic = new(StringComparer.Ordinal);

    public LoraModuleNames(PaliGemmaModel model)
    {
        const string v = "vision_tower.vision_model.", t = "language_model.model.";
        foreach (string name in model.LinearsByName.Keys) _modules.Add((name, ModuleKind.Linear));
        Add(ModuleKind.LmHead, "language_model.lm_head");
        Add(ModuleKind.Embedding, t + "embed_tokens", v + "embeddings.position_embedding");
        Add(ModuleKind.Conv2d, v + "embeddings.patch_embedding");
        Add(ModuleKind.Other, "language_model", t.TrimEnd('.'), t + "layers", t + "norm", t + "rotary_emb",
            "vision_tower", v.TrimEnd('.'), v + "embeddings", v + "encoder", v + "encoder.layers", v + "post_layernorm",
            "multi_modal_projector");
        for (int i = 0; i < model.Config.Text.NumHiddenLayers; i++)
        {
            string l = $"{t}layers.{i}";
            Add(ModuleKind.Other, l, l + ".self_attn", l + ".self_attn.rotary_emb", l + ".mlp", l + ".mlp.act_fn",
                l + ".input_layernorm", l + ".post_attention_layernorm");
        }
        for (int i = 0; i < model.Config.Vision.NumHiddenLayers; i++)
        {
            string l = $"{v}encoder.layers.{i}";
            Add(ModuleKind.Other, l, l + ".self_attn", l + ".layer_norm1", l + ".mlp", l + ".mlp.activation_fn", l + ".layer_norm2");
        }
        foreach (var (name, kind) in _modules) _kindByClassic.TryAdd(name, kind);
    }

    private void Add(ModuleKind kind, params string[] names)
    {
        foreach (string name in names) _modules.Add((name, kind));
    }

    /// <summary>Every module: its classic name, its name in <paramref name="layout"/> and its kind.</summary>
    public IEnumerable<(string Classic, string Name, ModuleKind Kind)> All(LoraNameLayout layout)
    {
        foreach (var (classic, kind) in _modules)
        {
            string? name = layout == LoraNameLayout.Classic ? classic : ToRestructured(classic);
            if (name is not null) yield return (classic, name, kind);
        }
    }

    public ModuleKind? KindOf(string classicName) => _kindByClassic.TryGetValue(classicName, out var kind) ? kind : null;

    /// <summary>transformers 4.52's names for a classic module path (null where the module has no counterpart).</summary>
    public static string? ToRestructured(string classic)
    {
        if (classic == "language_model.lm_head") return "lm_head";
        if (classic == "language_model") return null;   // GemmaForCausalLM is folded into the top model
        if (TryReplacePrefix(classic, "language_model.model", "model.language_model", out string? r)) return r;
        if (TryReplacePrefix(classic, "vision_tower", "model.vision_tower", out r)) return r;
        if (TryReplacePrefix(classic, "multi_modal_projector", "model.multi_modal_projector", out r)) return r;
        return null;
    }

    /// <summary>
    /// Reads a module path from an adapter tensor name (after <c>base_model.model.</c>): its layout and its classic name,
    /// or null when it is in neither layout.
    /// </summary>
    public static (LoraNameLayout Layout, string Classic)? Parse(string path)
    {
        if (path == "lm_head") return (LoraNameLayout.Restructured, "language_model.lm_head");
        if (TryReplacePrefix(path, "model.language_model", "language_model.model", out string? c)) return (LoraNameLayout.Restructured, c);
        if (TryReplacePrefix(path, "model.vision_tower", "vision_tower", out c)) return (LoraNameLayout.Restructured, c);
        if (TryReplacePrefix(path, "model.multi_modal_projector", "multi_modal_projector", out c)) return (LoraNameLayout.Restructured, c);
        if (path.StartsWith("language_model.", StringComparison.Ordinal) || path.StartsWith("vision_tower.", StringComparison.Ordinal) ||
            path.StartsWith("multi_modal_projector.", StringComparison.Ordinal))
            return (LoraNameLayout.Classic, path);
        return null;
    }

    private static bool TryReplacePrefix(string name, string prefix, string replacement, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out string? result)
    {
        if (name == prefix || (name.StartsWith(prefix, StringComparison.Ordinal) && name[prefix.Length] == '.'))
        {
            result = replacement + name[prefix.Length..];
            return true;
        }
        result = null;
        return false;
    }
}
