using System.Buffers;
using System.Diagnostics;
using System.Text.Json;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model.Synthesis;

public sealed record SyntheticAdapterOptions
{
    /// <summary>The modules PEFT's default PaliGemma recipe adapts. As in PEFT, a name matches every module whose path ends with it, so q/k/v also select SigLIP's attention projections.</summary>
    public static readonly IReadOnlyList<string> DefaultTargets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    /// <summary><c>r</c>.</summary>
    public int Rank { get; init; } = 8;
    /// <summary><c>lora_alpha</c>; the scaling is alpha / r.</summary>
    public double Alpha { get; init; } = 16;
    /// <summary><c>target_modules</c>: module names matched as PEFT matches a list (the whole path, or its end after a '.').</summary>
    public IReadOnlyList<string> TargetModules { get; init; } = DefaultTargets;
    public ulong Seed { get; init; }
    /// <summary>Stored dtype of lora_A and lora_B: F32 (PEFT keeps adapter weights in fp32 by default), BF16 or F16.</summary>
    public DType DType { get; init; } = DType.F32;
    /// <summary>
    /// How much the adapter changes each adapted layer: the standard deviation of scaling·B·A·x relative to that of W·x
    /// for unit-scale inputs (the synthetic base maps unit inputs to unit outputs). Default 0.1.
    /// </summary>
    public double RelativeDelta { get; init; } = 0.1;
    /// <summary>Replace adapter files already in the output folder instead of failing.</summary>
    public bool Overwrite { get; init; }
}

public sealed record SyntheticAdapterResult(string Directory, IReadOnlyList<string> Modules, int TensorCount, long TensorBytes, TimeSpan Elapsed);

/// <summary>
/// Writes a random LoRA adapter for a PaliGemma checkpoint in the layout PEFT's <c>save_pretrained</c> produces:
/// <c>adapter_config.json</c> and <c>adapter_model.safetensors</c> holding
/// <c>base_model.model.&lt;module path&gt;.lora_A.weight</c> [r, in] and <c>.lora_B.weight</c> [out, r] for every dense
/// layer that <see cref="SyntheticAdapterOptions.TargetModules"/> selects, header metadata <c>{"format": "pt"}</c>, data
/// in name order. Same model config, options and seed give the same bytes.
/// </summary>
/// <remarks>
/// A has the variance of PEFT's kaiming-uniform init (std 1/√(3·in)). B is not zero, as a trained adapter's is not: its
/// std is chosen so that scaling·B·A changes each layer's output by <see cref="SyntheticAdapterOptions.RelativeDelta"/>.
/// </remarks>
public static class SyntheticAdapter
{
    private const string TensorPrefix = "base_model.model.";

    /// <summary>Writes an adapter for the checkpoint whose config.json is in <paramref name="modelDirectory"/> (only the config is read).</summary>
    /// <exception cref="ArgumentException">An option is out of range, or a target selects no dense layer or selects a non-dense one.</exception>
    public static SyntheticAdapterResult Write(string modelDirectory, string outputDirectory, SyntheticAdapterOptions options, CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(modelDirectory);
        ArgumentException.ThrowIfNullOrEmpty(outputDirectory);
        ArgumentNullException.ThrowIfNull(options);
        if (options.Rank <= 0) throw new ArgumentException($"the rank must be positive, got {options.Rank}", nameof(options));
        if (!double.IsFinite(options.Alpha) || options.Alpha <= 0) throw new ArgumentException($"lora_alpha must be positive and finite, got {options.Alpha}", nameof(options));
        if (!double.IsFinite(options.RelativeDelta) || options.RelativeDelta <= 0) throw new ArgumentException($"the relative delta must be positive and finite, got {options.RelativeDelta}", nameof(options));
        if (options.DType is not (DType.F32 or DType.BF16 or DType.F16))
            throw new ArgumentException($"adapter weights are F32, BF16 or F16, not {options.DType}", nameof(options));
        if (options.TargetModules is not { Count: > 0 } targets || targets.Any(string.IsNullOrWhiteSpace))
            throw new ArgumentException("target modules must be a non-empty list of module names", nameof(options));

        var clock = Stopwatch.StartNew();
        string configPath = Path.Combine(modelDirectory, "config.json");
        if (!File.Exists(configPath)) throw new FileNotFoundException($"'{configPath}': config.json not found (--model must be a PaliGemma checkpoint folder)", configPath);
        var config = PaliGemmaConfig.Load(configPath);
        var modules = SelectModules(config, targets);

        string directory = Path.GetFullPath(outputDirectory);
        Directory.CreateDirectory(directory);
        string weightsPath = Path.Combine(directory, LoraAdapter.WeightsFileName);
        string adapterConfigPath = Path.Combine(directory, LoraConfig.FileName);
        if (!options.Overwrite && (File.Exists(weightsPath) || File.Exists(adapterConfigPath)))
            throw new IOException($"'{directory}' already holds an adapter ({LoraConfig.FileName} or {LoraAdapter.WeightsFileName}); choose an empty folder or overwrite");
        // The config goes last, so an interrupted run does not leave a folder that looks loadable.
        File.Delete(adapterConfigPath);

        // std(x·Aᵀ) = √(in)·std(A) = 1/√3 for unit inputs; then std(scaling·B·(x·Aᵀ)) = scaling·√r·std(B)/√3.
        double scaling = options.Alpha / options.Rank;
        var bInit = new TensorInit(0f, (float)(options.RelativeDelta * Math.Sqrt(3) / (scaling * Math.Sqrt(options.Rank))));
        var tensors = new List<SyntheticTensor>(modules.Count * 2);
        foreach (var (path, inFeatures, outFeatures) in modules)
        {
            tensors.Add(new SyntheticTensor(TensorPrefix + path + ".lora_A.weight", [options.Rank, inFeatures], new TensorInit(0f, (float)(1 / Math.Sqrt(3.0 * inFeatures)))));
            tensors.Add(new SyntheticTensor(TensorPrefix + path + ".lora_B.weight", [outFeatures, options.Rank], bInit));
        }
        tensors.Sort(static (x, y) => string.CompareOrdinal(x.Name, y.Name));   // safetensors' save_file lays tensors out by name

        var writer = new SafetensorsWriter(new Dictionary<string, string> { ["format"] = "pt" });
        foreach (var tensor in tensors)
        {
            var t = tensor;
            writer.Add(t.Name, options.DType, t.Shape, stream => SyntheticTensorData.WriteTensor(stream, options.Seed, t, options.DType, null, cancellationToken));
        }
        writer.WriteTo(weightsPath);
        File.WriteAllBytes(adapterConfigPath, AdapterConfigJson(options, Path.GetFullPath(modelDirectory)));
        long bytes = tensors.Sum(t => t.ByteLength(options.DType));
        return new SyntheticAdapterResult(directory, modules.Select(m => m.Path).ToArray(), tensors.Count, bytes, clock.Elapsed);
    }

    /// <summary>
    /// The dense layers of the model that <paramref name="targets"/> select, in checkpoint order, with their shapes.
    /// A target that selects an embedding, or no dense layer at all, is an error (PEFT fails on both).
    /// </summary>
    public static IReadOnlyList<(string Path, long InFeatures, long OutFeatures)> SelectModules(PaliGemmaConfig config, IReadOnlyList<string> targets)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(targets);
        var selected = new List<(string, long, long)>();
        foreach (var tensor in PaliGemmaTensorPlan.For(config))
        {
            if (!tensor.Name.EndsWith(".weight", StringComparison.Ordinal)) continue;
            string path = tensor.Name[..^".weight".Length];
            string? target = targets.FirstOrDefault(t => Matches(path, t));
            if (target is null) continue;
            // Embeddings are 2-D too, but they are lookups, not dense layers; norms are 1-D, the patch embedding is 4-D.
            bool isEmbedding = path.EndsWith("embed_tokens", StringComparison.Ordinal) || path.EndsWith("position_embedding", StringComparison.Ordinal);
            if (tensor.Shape.Length != 2 || isEmbedding)
                throw new ArgumentException($"target '{target}' selects '{path}', which is not a dense (Linear) layer", nameof(targets));
            selected.Add((path, tensor.Shape[1], tensor.Shape[0]));
        }
        if (selected.Count == 0)
            throw new ArgumentException($"target modules [{string.Join(", ", targets)}] select no dense layer of the model (e.g. q_proj, fc1, linear)", nameof(targets));
        return selected;
    }

    // PEFT's rule for a list of names: the module's path equals the name or ends with "." + name.
    private static bool Matches(string path, string target) =>
        path == target || (path.EndsWith(target, StringComparison.Ordinal) && path[^(target.Length + 1)] == '.');

    /// <summary>adapter_config.json with the fields (and values) PEFT 0.13's <c>LoraConfig</c> saves for a plain LoRA.</summary>
    private static byte[] AdapterConfigJson(SyntheticAdapterOptions options, string baseModel)
    {
        var buffer = new ArrayBufferWriter<byte>();
        using (var json = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = true, NewLine = "\n" }))
        {
            json.WriteStartObject();
            json.WriteStartObject("alpha_pattern");
            json.WriteEndObject();
            json.WriteNull("auto_mapping");
            json.WriteString("base_model_name_or_path", baseModel);
            json.WriteString("bias", "none");
            json.WriteBoolean("fan_in_fan_out", false);
            json.WriteBoolean("inference_mode", true);
            json.WriteBoolean("init_lora_weights", true);
            json.WriteNull("layer_replication");
            json.WriteNull("layers_pattern");
            json.WriteNull("layers_to_transform");
            json.WriteStartObject("loftq_config");
            json.WriteEndObject();
            json.WriteNumber("lora_alpha", options.Alpha);
            json.WritePropertyName("lora_dropout");
            json.WriteRawValue("0.0");   // as Python's json writes the float
            json.WriteNull("megatron_config");
            json.WriteString("megatron_core", "megatron.core");
            json.WriteNull("modules_to_save");
            json.WriteString("peft_type", "LORA");
            json.WriteNumber("r", options.Rank);
            json.WriteStartObject("rank_pattern");
            json.WriteEndObject();
            json.WriteNull("revision");
            json.WriteStartArray("target_modules");
            foreach (string target in options.TargetModules.Distinct(StringComparer.Ordinal)) json.WriteStringValue(target);
            json.WriteEndArray();
            json.WriteString("task_type", "CAUSAL_LM");
            json.WriteBoolean("use_dora", false);
            json.WriteBoolean("use_rslora", false);
            json.WriteEndObject();
        }
        return buffer.WrittenSpan.ToArray();
    }
}
