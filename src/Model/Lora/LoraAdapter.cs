using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model.Lora;

/// <summary>
/// A PEFT LoRA adapter (<c>adapter_config.json</c> + <c>adapter_model.safetensors</c>, as <c>save_pretrained</c> writes
/// them) checked against one loaded <see cref="PaliGemmaModel"/>. Use it at run time (pass it per request: the base
/// weights are shared by every adapter) or merge it at load (<see cref="PaliGemmaLoadOptions.MergeAdapterDirectory"/>).
/// Immutable and thread-safe.
/// </summary>
public sealed class LoraAdapter
{
    public const string WeightsFileName = "adapter_model.safetensors";
    private const string TensorPrefix = "base_model.model.";
    private const string SuffixA = ".lora_A.weight", SuffixB = ".lora_B.weight";

    private readonly LoraModule?[] _bySlot;

    private LoraAdapter(string directory, LoraConfig config, LoraNameLayout layout, PaliGemmaModel baseModel, LoraModule[] modules)
    {
        Directory = directory;
        Config = config;
        Layout = layout;
        BaseModel = baseModel;
        Modules = modules;
        _bySlot = new LoraModule?[baseModel.AdapterSlotCount];
        foreach (var m in modules) _bySlot[m.Target.AdapterSlot] = m;
    }

    /// <summary>Full path of the adapter folder.</summary>
    public string Directory { get; }
    public LoraConfig Config { get; }
    /// <summary>The module-name layout the adapter's tensors use.</summary>
    public LoraNameLayout Layout { get; }
    /// <summary>The model this adapter was checked against and is used with.</summary>
    public PaliGemmaModel BaseModel { get; }
    /// <summary>The adapted layers, in model order (vision tower, projector, decoder).</summary>
    public IReadOnlyList<LoraModule> Modules { get; }

    internal LoraModule? ModuleAt(int slot) => _bySlot[slot];

    /// <summary>
    /// Reads the adapter in <paramref name="adapterDirectory"/> and checks it against <paramref name="baseModel"/>: every
    /// tensor must be a lora_A/lora_B weight of a dense layer that target_modules selects, with shapes that fit the base
    /// layer and the configured rank. A and B are kept in fp32 (BF16/F16 files are widened). Errors name the field,
    /// the tensor and the file. Prefer <see cref="PaliGemmaModel.LoadAdapter"/>, which loads each folder once.
    /// </summary>
    /// <exception cref="DirectoryNotFoundException">The folder does not exist.</exception>
    /// <exception cref="FileNotFoundException">adapter_config.json or adapter_model.safetensors is missing.</exception>
    /// <exception cref="InvalidDataException">The adapter is malformed, does not fit the model, or uses something this runtime does not support.</exception>
    public static LoraAdapter Load(string adapterDirectory, PaliGemmaModel baseModel)
    {
        ArgumentException.ThrowIfNullOrEmpty(adapterDirectory);
        ArgumentNullException.ThrowIfNull(baseModel);
        string directory = Path.GetFullPath(adapterDirectory);
        if (!System.IO.Directory.Exists(directory)) throw new DirectoryNotFoundException($"'{directory}': LoRA adapter folder not found");
        var config = LoraConfig.Load(Path.Combine(directory, LoraConfig.FileName));

        string weightsPath = Path.Combine(directory, WeightsFileName);
        if (!File.Exists(weightsPath))
        {
            throw File.Exists(Path.Combine(directory, "adapter_model.bin"))
                ? new InvalidDataException($"'{directory}': only adapter_model.bin (a pickled PyTorch file) is there; save the adapter with safe_serialization=True to get {WeightsFileName}")
                : new FileNotFoundException($"'{weightsPath}': {WeightsFileName} not found", weightsPath);
        }

        using var file = SafetensorsFile.Open(weightsPath);
        var names = new LoraModuleNames(baseModel);
        string fileName = WeightsFileName;

        // 1. Every tensor: a lora_A / lora_B weight of a known dense layer, all in one name layout.
        LoraNameLayout? layout = null;
        var pairs = new Dictionary<string, (string? A, string? B)>(StringComparer.Ordinal);
        foreach (string tensor in file.TensorNames)
        {
            var (classic, isA, tensorLayout) = ParseTensorName(tensor, fileName, names);
            if (layout is { } seen && seen != tensorLayout)
                throw new InvalidDataException($"'{weightsPath}': tensor '{tensor}' uses the {tensorLayout} module names but earlier tensors use the {seen} names; an adapter uses one layout");
            layout = tensorLayout;
            pairs.TryGetValue(classic, out var pair);
            pairs[classic] = isA ? (tensor, pair.B) : (pair.A, tensor);
        }
        if (layout is null) throw new InvalidDataException($"'{weightsPath}': the file holds no LoRA tensors");

        // 2. What target_modules selects, in the adapter's layout: only dense layers may be selected.
        var targeted = new Dictionary<string, string>(StringComparer.Ordinal);   // classic -> name in the layout
        foreach (var (classic, name, kind) in names.All(layout.Value))
        {
            if (!config.Targets(name, kind is ModuleKind.Linear or ModuleKind.LmHead, kind == ModuleKind.LmHead)) continue;
            if (kind != ModuleKind.Linear)
                throw LoraConfig.Field(config.Path, "target_modules", $"selects '{name}', {Describe(kind)}");
            targeted.Add(classic, name);
        }
        if (targeted.Count == 0)
        {
            string what = config.TargetModulesRegex is { } regex ? $"\"{regex}\"" : "[" + string.Join(", ", config.TargetModuleNames!.Select(t => $"\"{t}\"")) + "]";
            throw LoraConfig.Field(config.Path, "target_modules", $"is {what}, which matches no dense layer of the base model (module names in the {layout} layout, e.g. '{names.All(layout.Value).First(m => m.Kind == ModuleKind.Linear).Name}')");
        }
        foreach (var (classic, pair) in pairs)
        {
            if (!targeted.ContainsKey(classic))
                throw new InvalidDataException($"'{weightsPath}': tensor '{pair.A ?? pair.B}' adapts '{classic}', which target_modules in {LoraConfig.FileName} does not select");
        }

        // 3. A and B of every selected layer, shapes against the base layer and the configured rank.
        var modules = new List<LoraModule>(targeted.Count);
        foreach (var (classic, name) in targeted)
        {
            var linear = baseModel.LinearsByName[classic];
            string prefix = TensorPrefix + name;
            pairs.TryGetValue(classic, out var pair);
            if (pair.A is null || pair.B is null)
                throw new InvalidDataException($"'{weightsPath}': tensor '{prefix}{(pair.A is null ? SuffixA : SuffixB)}' is missing; target_modules selects '{name}'");
            var (rank, alpha) = config.RankAndAlphaFor(name);
            var a = Read(file, pair.A, [rank, linear.InFeatures], weightsPath, rank);
            var b = Read(file, pair.B, [linear.OutFeatures, rank], weightsPath, rank, transpose: true);
            modules.Add(new LoraModule(classic, linear, a, b, rank, config.Scaling(rank, alpha)));
        }
        modules.Sort((x, y) => x.Target.AdapterSlot.CompareTo(y.Target.AdapterSlot));
        return new LoraAdapter(directory, config, layout.Value, baseModel, [.. modules]);
    }

    /// <summary>Writes W + scaling·B·A into private copies (in the base weights' dtype) of the adapted weights of <paramref name="model"/>; only while loading it.</summary>
    internal void MergeInto(PaliGemmaModel model)
    {
        if (!ReferenceEquals(model, BaseModel)) throw new ArgumentException("the adapter was loaded for another model", nameof(model));
        foreach (var module in Modules)
        {
            if (module.Target.HasMergedWeight) throw new InvalidOperationException($"'{module.Name}' already holds a merged weight");
            module.Target.UseMergedWeight(module.Merge(module.Target.Weight));
        }
    }

    private static (string Classic, bool IsA, LoraNameLayout Layout) ParseTensorName(string tensor, string file, LoraModuleNames names)
    {
        string where = $"'{file}': tensor '{tensor}'";
        if (tensor.Contains("lora_embedding_A", StringComparison.Ordinal) || tensor.Contains("lora_embedding_B", StringComparison.Ordinal))
            throw new InvalidDataException($"{where} is a LoRA on an embedding; LoRA on embeddings is not supported");
        if (tensor.Contains("lora_magnitude_vector", StringComparison.Ordinal))
            throw new InvalidDataException($"{where} is a DoRA magnitude vector; DoRA (use_dora) is not supported");
        if (tensor.Contains(".modules_to_save.", StringComparison.Ordinal))
            throw new InvalidDataException($"{where} is a full replacement module (modules_to_save), which is not supported");
        if (!tensor.StartsWith(TensorPrefix, StringComparison.Ordinal))
            throw new InvalidDataException($"{where} does not start with '{TensorPrefix}', the prefix PEFT's save_pretrained writes");

        bool isA = tensor.EndsWith(SuffixA, StringComparison.Ordinal);
        if (!isA && !tensor.EndsWith(SuffixB, StringComparison.Ordinal))
        {
            throw tensor.EndsWith(".lora_B.bias", StringComparison.Ordinal)
                ? new InvalidDataException($"{where} is a trained LoRA bias (lora_bias), which is not supported")
                : new InvalidDataException($"{where} is not a LoRA weight: names end in '{SuffixA}' or '{SuffixB}'");
        }
        string path = tensor[TensorPrefix.Length..^SuffixA.Length];
        if (LoraModuleNames.Parse(path) is not { } parsed)
            throw new InvalidDataException($"{where}: module '{path}' is not a PaliGemma module path (neither 'language_model.model...' / 'vision_tower...' nor 'model.language_model...' / 'model.vision_tower...')");
        var kind = names.KindOf(parsed.Classic);
        if (kind is null)
            throw new InvalidDataException($"{where}: module '{path}' does not exist in the base model");
        if (kind != ModuleKind.Linear)
            throw new InvalidDataException($"{where}: module '{path}' is {Describe(kind.Value)}");
        return (parsed.Classic, isA, parsed.Layout);
    }

    private static string Describe(ModuleKind kind) => kind switch
    {
        ModuleKind.LmHead => "the LM head; LoRA on lm_head is not supported (it is tied to embed_tokens)",
        ModuleKind.Embedding => "an embedding; LoRA on embeddings is not supported",
        ModuleKind.Conv2d => "the patch-embedding convolution; LoRA on Conv2d is not supported",
        _ => "not a dense (Linear) layer, so LoRA cannot adapt it",
    };

    /// <summary>A [rank, in] as stored, or with <paramref name="transpose"/> B [out, rank] as [rank, out]; pinned fp32 either way.</summary>
    private static unsafe float[] Read(SafetensorsFile file, string name, long[] expectedShape, string path, int rank, bool transpose = false)
    {
        var tensor = file.Get(name);
        if (!tensor.Shape.AsSpan().SequenceEqual(expectedShape))
            throw new InvalidDataException(
                $"'{path}': tensor '{name}' has shape {tensor.ShapeText} but the base layer and r = {rank} (from {LoraConfig.FileName}) need {TensorData.FormatShape(expectedShape)}");
        if (!tensor.DType.IsKernelFloat())
            throw new InvalidDataException($"'{path}': tensor '{name}' has dtype {tensor.DType.ToHeaderName()}; LoRA weights must be F32, BF16 or F16");
        // Widened straight into the pinned array (through one pooled row when transposing): no second copy on the heap.
        int rows = (int)expectedShape[0], cols = (int)expectedShape[1];
        float[] pinned = GC.AllocateUninitializedArray<float>(checked(rows * cols), pinned: true);
        if (!transpose)
        {
            LoraModule.Widen(tensor.Pointer, tensor.DType, pinned);
            return pinned;
        }
        float[] row = System.Buffers.ArrayPool<float>.Shared.Rent(cols);
        int elementSize = tensor.DType.SizeOf();
        for (int n = 0; n < rows; n++)
        {
            LoraModule.Widen(tensor.Pointer + (nint)n * cols * elementSize, tensor.DType, row.AsSpan(0, cols));
            for (int j = 0; j < cols; j++) pinned[j * rows + n] = row[j];
        }
        System.Buffers.ArrayPool<float>.Shared.Return(row);
        return pinned;
    }
}
