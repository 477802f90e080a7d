using System.Text.Json;
using System.Text.Json.Serialization;

namespace PaliGemma.CpuOnly.Model;

/// <summary>
/// The parts of a Hugging Face PaliGemma <c>config.json</c> the runtime uses, with the defaults transformers applies to keys
/// the file omits: PaliGemmaConfig, SiglipVisionConfig and, by <c>text_config.model_type</c>, GemmaConfig (PaliGemma 1,
/// as in 4.45) or Gemma2Config (PaliGemma 2, as in 4.47).
/// </summary>
public sealed record PaliGemmaConfig
{
    public required VisionConfig Vision { get; init; }
    public required TextConfig Text { get; init; }
    public int ImageTokenIndex { get; init; }
    public int ProjectionDim { get; init; }
    public int BosTokenId { get; init; }
    public int EosTokenId { get; init; }
    public int PadTokenId { get; init; }

    /// <summary>Image tokens per image: (image_size / patch_size)².</summary>
    public int NumImageTokens => Vision.PatchesPerSide * Vision.PatchesPerSide;

    public static PaliGemmaConfig Load(string path)
    {
        if (!File.Exists(path))
            throw new FileNotFoundException($"'{path}': config.json not found (a Hugging Face PaliGemma checkpoint folder has one)", path);
        byte[] bytes = File.ReadAllBytes(path);
        return Parse(bytes, path);
    }

    public static PaliGemmaConfig Parse(ReadOnlySpan<byte> json, string sourceName)
    {
        RawPaliGemmaConfig? raw;
        try
        {
            raw = JsonSerializer.Deserialize(json, ConfigJsonContext.Default.RawPaliGemmaConfig);
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"'{sourceName}': invalid config JSON: {e.Message}", e);
        }
        if (raw is null) throw new InvalidDataException($"'{sourceName}': config JSON is null");
        return FromRaw(raw, sourceName);
    }

    private static PaliGemmaConfig FromRaw(RawPaliGemmaConfig raw, string source)
    {
        if (raw.ModelType is not null && raw.ModelType != "paligemma")
            throw new InvalidDataException($"'{source}': model_type is '{raw.ModelType}', expected 'paligemma'");

        int projectionDim = raw.ProjectionDim ?? 2048;
        int topVocab = raw.VocabSize ?? 257152;

        // PaliGemmaConfig: no vision_config gives the So400m defaults; a given one fills in SiglipVisionConfig defaults.
        var rv = raw.VisionConfig;
        VisionConfig vision = rv is null
            ? new VisionConfig { HiddenSize = 1152, IntermediateSize = 4096, NumHiddenLayers = 27, NumAttentionHeads = 16, PatchSize = 14, ImageSize = 224, NumChannels = 3, LayerNormEps = 1e-6f, HiddenAct = "gelu_pytorch_tanh" }
            : new VisionConfig
            {
                HiddenSize = rv.HiddenSize ?? 768,
                IntermediateSize = rv.IntermediateSize ?? 3072,
                NumHiddenLayers = rv.NumHiddenLayers ?? 12,
                NumAttentionHeads = rv.NumAttentionHeads ?? 12,
                NumChannels = rv.NumChannels ?? 3,
                ImageSize = rv.ImageSize ?? 224,
                PatchSize = rv.PatchSize ?? 16,
                LayerNormEps = (float)(rv.LayerNormEps ?? 1e-6),
                HiddenAct = rv.HiddenAct ?? "gelu_pytorch_tanh",
            };
        if (rv?.ModelType is { } vt && vt != "siglip_vision_model")
            throw new InvalidDataException($"'{source}': vision_config.model_type is '{vt}', only 'siglip_vision_model' is supported");

        var rt = raw.TextConfig;
        TextConfig text = rt is null
            ? new TextConfig { ModelType = "gemma", HiddenSize = 2048, NumHiddenLayers = 18, IntermediateSize = 16384, NumAttentionHeads = 8, NumKeyValueHeads = 1, HeadDim = 256, VocabSize = topVocab, RmsNormEps = 1e-6f, RopeTheta = 10000f, HiddenActivation = "gelu_pytorch_tanh", MaxPositionEmbeddings = 8192 }
            : rt.ModelType == "gemma2" ? Gemma2Text(rt, raw, source) : new TextConfig
            {
                ModelType = rt.ModelType ?? "gemma",
                HiddenSize = rt.HiddenSize ?? 3072,
                NumHiddenLayers = rt.NumHiddenLayers ?? 28,
                IntermediateSize = rt.IntermediateSize ?? 24576,
                NumAttentionHeads = rt.NumAttentionHeads ?? 16,
                NumKeyValueHeads = rt.NumKeyValueHeads ?? 16,   // GemmaConfig default, not the head count
                HeadDim = rt.HeadDim ?? 256,
                VocabSize = rt.VocabSize ?? 256000,
                RmsNormEps = (float)(rt.RmsNormEps ?? 1e-6),
                RopeTheta = (float)(rt.RopeTheta ?? 10000.0),
                // Gemma uses hidden_activation, falling back to hidden_act, then gelu_pytorch_tanh.
                HiddenActivation = rt.HiddenActivation ?? rt.HiddenAct ?? "gelu_pytorch_tanh",
                MaxPositionEmbeddings = rt.MaxPositionEmbeddings ?? 8192,
                AttentionBias = rt.AttentionBias ?? false,
                TieWordEmbeddings = rt.TieWordEmbeddings ?? raw.TieWordEmbeddings ?? true,
            };

        var config = new PaliGemmaConfig
        {
            Vision = vision,
            Text = text,
            ImageTokenIndex = raw.ImageTokenIndex ?? 256000,
            ProjectionDim = projectionDim,
            BosTokenId = raw.BosTokenId ?? rt?.BosTokenId ?? 2,
            EosTokenId = raw.EosTokenId ?? rt?.EosTokenId ?? 1,
            PadTokenId = raw.PadTokenId ?? rt?.PadTokenId ?? 0,
        };
        config.Validate(source);
        return config;
    }

    /// <summary>Gemma2Config (transformers 4.47) defaults: the Gemma 2 2B shape, window 4096, soft-caps 50 / 30.</summary>
    private static TextConfig Gemma2Text(RawTextConfig rt, RawPaliGemmaConfig raw, string source) => new()
    {
        ModelType = "gemma2",
        HiddenSize = rt.HiddenSize ?? 2304,
        NumHiddenLayers = rt.NumHiddenLayers ?? 26,
        IntermediateSize = rt.IntermediateSize ?? 9216,
        NumAttentionHeads = rt.NumAttentionHeads ?? 8,
        NumKeyValueHeads = rt.NumKeyValueHeads ?? 4,
        HeadDim = rt.HeadDim ?? 256,
        VocabSize = rt.VocabSize ?? 256000,
        RmsNormEps = (float)(rt.RmsNormEps ?? 1e-6),
        RopeTheta = (float)(rt.RopeTheta ?? 10000.0),
        // Gemma2Config reads hidden_activation only (hidden_act is not a fallback there).
        HiddenActivation = rt.HiddenActivation ?? "gelu_pytorch_tanh",
        MaxPositionEmbeddings = rt.MaxPositionEmbeddings ?? 8192,
        AttentionBias = rt.AttentionBias ?? false,
        TieWordEmbeddings = rt.TieWordEmbeddings ?? raw.TieWordEmbeddings ?? true,
        QueryPreAttnScalar = (float)(rt.QueryPreAttnScalar ?? 256.0),
        SlidingWindow = rt.SlidingWindow ?? 4096,
        AttnLogitSoftcapping = OptionalCap(rt.AttnLogitSoftcapping, 50.0, "text_config.attn_logit_softcapping", source),
        FinalLogitSoftcapping = OptionalCap(rt.FinalLogitSoftcapping, 30.0, "text_config.final_logit_softcapping", source),
    };

    // Absent: the default; JSON null: no soft-cap (transformers skips the cap when the value is None).
    private static float? OptionalCap(JsonElement value, double defaultValue, string key, string source) => value.ValueKind switch
    {
        JsonValueKind.Undefined => (float)defaultValue,
        JsonValueKind.Null => null,
        JsonValueKind.Number => (float)value.GetDouble(),
        _ => throw new InvalidDataException($"'{source}': {key} must be a number or null, got {value.ValueKind}"),
    };

    /// <summary>Checks the values the runtime depends on; errors name the key.</summary>
    public void Validate(string source)
    {
        static void Positive(string source, string key, int value)
        {
            if (value <= 0) throw new InvalidDataException($"'{source}': {key} must be positive, got {value}");
        }
        Positive(source, "vision_config.hidden_size", Vision.HiddenSize);
        Positive(source, "vision_config.intermediate_size", Vision.IntermediateSize);
        Positive(source, "vision_config.num_hidden_layers", Vision.NumHiddenLayers);
        Positive(source, "vision_config.num_attention_heads", Vision.NumAttentionHeads);
        Positive(source, "vision_config.image_size", Vision.ImageSize);
        Positive(source, "vision_config.patch_size", Vision.PatchSize);
        if (Vision.NumChannels != 3) throw new InvalidDataException($"'{source}': vision_config.num_channels is {Vision.NumChannels}; PaliGemma takes RGB (3)");
        if (Vision.HiddenSize % Vision.NumAttentionHeads != 0)
            throw new InvalidDataException($"'{source}': vision_config.hidden_size {Vision.HiddenSize} is not divisible by num_attention_heads {Vision.NumAttentionHeads}");
        if (Vision.ImageSize % Vision.PatchSize != 0)
            throw new InvalidDataException($"'{source}': vision_config.image_size {Vision.ImageSize} is not a multiple of patch_size {Vision.PatchSize}");
        if (Vision.HiddenAct != "gelu_pytorch_tanh")
            throw new InvalidDataException($"'{source}': vision_config.hidden_act '{Vision.HiddenAct}' is not supported (gelu_pytorch_tanh)");

        if (Text.ModelType is not ("gemma" or "gemma2"))
            throw new InvalidDataException($"'{source}': text_config.model_type '{Text.ModelType}' is not supported (gemma for PaliGemma 1, gemma2 for PaliGemma 2)");
        Positive(source, "text_config.hidden_size", Text.HiddenSize);
        Positive(source, "text_config.num_hidden_layers", Text.NumHiddenLayers);
        Positive(source, "text_config.intermediate_size", Text.IntermediateSize);
        Positive(source, "text_config.num_attention_heads", Text.NumAttentionHeads);
        Positive(source, "text_config.num_key_value_heads", Text.NumKeyValueHeads);
        Positive(source, "text_config.head_dim", Text.HeadDim);
        Positive(source, "text_config.vocab_size", Text.VocabSize);
        Positive(source, "projection_dim", ProjectionDim);
        if (Text.NumAttentionHeads % Text.NumKeyValueHeads != 0)
            throw new InvalidDataException($"'{source}': text_config.num_attention_heads {Text.NumAttentionHeads} is not a multiple of num_key_value_heads {Text.NumKeyValueHeads}");
        if (Text.HeadDim % 2 != 0) throw new InvalidDataException($"'{source}': text_config.head_dim {Text.HeadDim} must be even for rotary embeddings");
        if (Text.IsGemma2)
        {
            Positive(source, "text_config.sliding_window", Text.SlidingWindow ?? 0);
            if (!(Text.QueryPreAttnScalar > 0f) || !float.IsFinite(Text.QueryPreAttnScalar ?? 0f))
                throw new InvalidDataException($"'{source}': text_config.query_pre_attn_scalar must be positive, got {Text.QueryPreAttnScalar}");
            if (Text.AttnLogitSoftcapping is { } attnCap && !(attnCap > 0f && float.IsFinite(attnCap)))
                throw new InvalidDataException($"'{source}': text_config.attn_logit_softcapping must be positive or null, got {attnCap}");
            if (Text.FinalLogitSoftcapping is { } finalCap && !(finalCap > 0f && float.IsFinite(finalCap)))
                throw new InvalidDataException($"'{source}': text_config.final_logit_softcapping must be positive or null, got {finalCap}");
            if (Text.HiddenActivation != "gelu_pytorch_tanh")
                throw new InvalidDataException($"'{source}': text_config.hidden_activation '{Text.HiddenActivation}' is not supported (gelu_pytorch_tanh)");
        }
        if (Text.HiddenActivation is not ("gelu_pytorch_tanh" or "gelu"))
            throw new InvalidDataException($"'{source}': text_config.hidden_activation '{Text.HiddenActivation}' is not supported (gelu_pytorch_tanh)");
        if (ProjectionDim != Text.HiddenSize)
            throw new InvalidDataException($"'{source}': projection_dim {ProjectionDim} differs from text_config.hidden_size {Text.HiddenSize}; the projector output feeds the decoder directly");
        if (ImageTokenIndex < 0 || ImageTokenIndex >= Text.VocabSize)
            throw new InvalidDataException($"'{source}': image_token_index {ImageTokenIndex} is outside the text vocabulary (0..{Text.VocabSize - 1})");
        if (!Text.TieWordEmbeddings)
            throw new InvalidDataException($"'{source}': tie_word_embeddings false is not supported (PaliGemma ties the LM head to the embeddings)");
    }
}

public sealed record VisionConfig
{
    public int HiddenSize { get; init; }
    public int IntermediateSize { get; init; }
    public int NumHiddenLayers { get; init; }
    public int NumAttentionHeads { get; init; }
    public int NumChannels { get; init; } = 3;
    public int ImageSize { get; init; }
    public int PatchSize { get; init; }
    public float LayerNormEps { get; init; }
    public string HiddenAct { get; init; } = "gelu_pytorch_tanh";
    public int PatchesPerSide => ImageSize / PatchSize;
    public int HeadDim => HiddenSize / NumAttentionHeads;
}

public sealed record TextConfig
{
    public string ModelType { get; init; } = "gemma";
    public int HiddenSize { get; init; }
    public int NumHiddenLayers { get; init; }
    public int IntermediateSize { get; init; }
    public int NumAttentionHeads { get; init; }
    public int NumKeyValueHeads { get; init; }
    public int HeadDim { get; init; }
    public int VocabSize { get; init; }
    public float RmsNormEps { get; init; }
    public float RopeTheta { get; init; }
    public string HiddenActivation { get; init; } = "gelu_pytorch_tanh";
    public int MaxPositionEmbeddings { get; init; }
    public bool AttentionBias { get; init; }
    public bool TieWordEmbeddings { get; init; } = true;

    // Gemma 2 only (null for Gemma 1).
    /// <summary>Attention scores are scaled by QueryPreAttnScalar^-0.5 instead of HeadDim^-0.5.</summary>
    public float? QueryPreAttnScalar { get; init; }
    /// <summary>Even layers attend only keys j &gt; i − SlidingWindow (the past is limited; later prefix keys stay visible).</summary>
    public int? SlidingWindow { get; init; }
    /// <summary>scores = cap · tanh(scores / cap) before the mask and softmax; null for none.</summary>
    public float? AttnLogitSoftcapping { get; init; }
    /// <summary>logits = cap · tanh(logits / cap); null for none.</summary>
    public float? FinalLogitSoftcapping { get; init; }

    /// <summary>Gemma 2 decoder: four norms per layer, sliding/global alternation, soft-caps.</summary>
    public bool IsGemma2 => ModelType == "gemma2";

    /// <summary>The factor attention scores are multiplied by.</summary>
    public float AttentionScale => 1f / MathF.Sqrt(QueryPreAttnScalar ?? HeadDim);

    /// <summary>The sliding window of <paramref name="layer"/>, or 0 when it attends globally: Gemma 2 slides on even layers.</summary>
    public int LayerWindow(int layer) => IsGemma2 && layer % 2 == 0 ? SlidingWindow ?? 0 : 0;
}

// The JSON as written; every key optional so defaults can be applied exactly where the file is silent.
internal sealed class RawPaliGemmaConfig
{
    [JsonPropertyName("model_type")] public string? ModelType { get; set; }
    [JsonPropertyName("image_token_index")] public int? ImageTokenIndex { get; set; }
    [JsonPropertyName("projection_dim")] public int? ProjectionDim { get; set; }
    [JsonPropertyName("vocab_size")] public int? VocabSize { get; set; }
    [JsonPropertyName("hidden_size")] public int? HiddenSize { get; set; }
    [JsonPropertyName("bos_token_id")] public int? BosTokenId { get; set; }
    [JsonPropertyName("eos_token_id")] public int? EosTokenId { get; set; }
    [JsonPropertyName("pad_token_id")] public int? PadTokenId { get; set; }
    [JsonPropertyName("tie_word_embeddings")] public bool? TieWordEmbeddings { get; set; }
    [JsonPropertyName("vision_config")] public RawVisionConfig? VisionConfig { get; set; }
    [JsonPropertyName("text_config")] public RawTextConfig? TextConfig { get; set; }
}

internal sealed class RawVisionConfig
{
    [JsonPropertyName("model_type")] public string? ModelType { get; set; }
    [JsonPropertyName("hidden_size")] public int? HiddenSize { get; set; }
    [JsonPropertyName("intermediate_size")] public int? IntermediateSize { get; set; }
    [JsonPropertyName("num_hidden_layers")] public int? NumHiddenLayers { get; set; }
    [JsonPropertyName("num_attention_heads")] public int? NumAttentionHeads { get; set; }
    [JsonPropertyName("num_channels")] public int? NumChannels { get; set; }
    [JsonPropertyName("image_size")] public int? ImageSize { get; set; }
    [JsonPropertyName("patch_size")] public int? PatchSize { get; set; }
    [JsonPropertyName("layer_norm_eps")] public double? LayerNormEps { get; set; }
    [JsonPropertyName("hidden_act")] public string? HiddenAct { get; set; }
}

internal sealed class RawTextConfig
{
    [JsonPropertyName("model_type")] public string? ModelType { get; set; }
    [JsonPropertyName("hidden_size")] public int? HiddenSize { get; set; }
    [JsonPropertyName("num_hidden_layers")] public int? NumHiddenLayers { get; set; }
    [JsonPropertyName("intermediate_size")] public int? IntermediateSize { get; set; }
    [JsonPropertyName("num_attention_heads")] public int? NumAttentionHeads { get; set; }
    [JsonPropertyName("num_key_value_heads")] public int? NumKeyValueHeads { get; set; }
    [JsonPropertyName("head_dim")] public int? HeadDim { get; set; }
    [JsonPropertyName("vocab_size")] public int? VocabSize { get; set; }
    [JsonPropertyName("rms_norm_eps")] public double? RmsNormEps { get; set; }
    [JsonPropertyName("rope_theta")] public double? RopeTheta { get; set; }
    [JsonPropertyName("hidden_activation")] public string? HiddenActivation { get; set; }
    [JsonPropertyName("hidden_act")] public string? HiddenAct { get; set; }
    [JsonPropertyName("max_position_embeddings")] public int? MaxPositionEmbeddings { get; set; }
    [JsonPropertyName("attention_bias")] public bool? AttentionBias { get; set; }
    [JsonPropertyName("tie_word_embeddings")] public bool? TieWordEmbeddings { get; set; }
    [JsonPropertyName("bos_token_id")] public int? BosTokenId { get; set; }
    [JsonPropertyName("eos_token_id")] public int? EosTokenId { get; set; }
    [JsonPropertyName("pad_token_id")] public int? PadTokenId { get; set; }
    [JsonPropertyName("query_pre_attn_scalar")] public double? QueryPreAttnScalar { get; set; }
    [JsonPropertyName("sliding_window")] public int? SlidingWindow { get; set; }
    // JsonElement keeps "absent" (Undefined: default applies) apart from an explicit null (no soft-cap).
    [JsonPropertyName("attn_logit_softcapping")] public JsonElement AttnLogitSoftcapping { get; set; }
    [JsonPropertyName("final_logit_softcapping")] public JsonElement FinalLogitSoftcapping { get; set; }
}

[JsonSourceGenerationOptions(ReadCommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true, NumberHandling = JsonNumberHandling.AllowReadingFromString)]
[JsonSerializable(typeof(RawPaliGemmaConfig))]
internal sealed partial class ConfigJsonContext : JsonSerializerContext;
