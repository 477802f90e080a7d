using System.Collections.Concurrent;
using System.Diagnostics;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Text;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model;

/// <summary>Intermediate vision tensors, filled when a caller asks for them (reference tests, debugging).</summary>
public sealed class VisionTrace
{
    /// <summary>SigLIP last hidden state [B, tokens, vision hidden].</summary>
    public float[]? LastHiddenState { get; set; }
    /// <summary>Projector output before the 1/sqrt(text hidden) scaling [B, tokens, text hidden].</summary>
    public float[]? ProjectorOutput { get; set; }
}

/// <summary>Options for <see cref="PaliGemmaModel.Load(string, PaliGemmaLoadOptions)"/>.</summary>
public sealed record PaliGemmaLoadOptions
{
    /// <summary>tokenizer.model to use instead of the one in the folder (for weight-only folders).</summary>
    public string? TokenizerPath { get; init; }

    /// <summary>
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to merge at load:
    /// W' = W + scaling·B·A is written into private copies of only the adapted matrices, in the checkpoint's dtype (as PEFT's
    /// merge_and_unload keeps it: summed in fp32, then rounded); the rest stays mapped.
    /// </summary>
    public string? MergeAdapterDirectory { get; init; }

    /// <summary>
    /// Quantizes every Linear weight to this format at load (the embedding / LM head to q8) into private memory; null keeps
    /// the stored weights. A checkpoint already quantized must have been quantized to the same format.
    /// </summary>
    public Quant.QuantFormat? QuantizeTo { get; init; }

    /// <summary>
    /// How <see cref="QuantizeTo"/> chooses each block's scale: the block's absmax (the default: quantizing at load is
    /// several times faster than with the search) or <see cref="Quant.ScaleSelection.MinimumError"/>, the least-error
    /// search that <c>paligemma quantize</c> writes (the same bytes), about 10 % less rms weight error.
    /// </summary>
    public Quant.ScaleSelection QuantizeScales { get; init; } = Quant.ScaleSelection.AbsMax;

    /// <summary>
    /// Where the model computes: null or <see cref="Kernels.Backends.CpuBackend.Instance"/> for the CPU (the default), or a
    /// device backend (e.g. the ILGPU one, for JIT hosts). Weights are made resident on it once, at load.
    /// </summary>
    public Kernels.Backends.IComputeBackend? Backend { get; init; }
}

/// <summary>
/// A loaded PaliGemma checkpoint: config, tokenizer, SigLIP tower, projector and Gemma decoder over memory-mapped weights.
/// Immutable after loading and safe to share between threads; per-request state lives in <see cref="KvCache"/>s.
/// </summary>
public sealed class PaliGemmaModel : IDisposable
{
    private readonly SafetensorsCheckpoint _checkpoint;
    private readonly Linear[] _adaptableLinears;
    private readonly Dictionary<string, Linear> _linearByName;
    private readonly ConcurrentDictionary<string, Lazy<LoraAdapter>> _adapters = new(StringComparer.Ordinal);

    private PaliGemmaModel(string directory, PaliGemmaConfig config, SafetensorsCheckpoint checkpoint, PaliGemmaTokenizer tokenizer, TimeSpan loadTime)
    {
        Directory = directory;
        Config = config;
        _checkpoint = checkpoint;
        Tokenizer = tokenizer;
        Vision = new SigLipVisionTower(config.Vision, checkpoint);
        Projector = new MultiModalProjector(config.Vision.HiddenSize, config.ProjectionDim, checkpoint);
        Decoder = new GemmaDecoder(config.Text, checkpoint);
        LoadTime = loadTime;

        // Every dense layer a LoRA adapter may target gets a slot; adapters keep their modules in slot order.
        _adaptableLinears = [.. Vision.Linears, Projector.Linear, .. Decoder.Linears];
        _linearByName = new Dictionary<string, Linear>(_adaptableLinears.Length, StringComparer.Ordinal);
        for (int i = 0; i < _adaptableLinears.Length; i++)
        {
            _adaptableLinears[i].AdapterSlot = i;
            _linearByName.Add(_adaptableLinears[i].Name, _adaptableLinears[i]);
        }
    }

    public string Directory { get; }
    public PaliGemmaConfig Config { get; }
    public PaliGemmaTokenizer Tokenizer { get; }
    public SigLipVisionTower Vision { get; }
    public MultiModalProjector Projector { get; }
    public GemmaDecoder Decoder { get; }
    public TimeSpan LoadTime { get; private set; }

    /// <summary>The adapter merged into the weights at load (<see cref="PaliGemmaLoadOptions.MergeAdapterDirectory"/>), or null.</summary>
    public LoraAdapter? MergedAdapter { get; private set; }

    /// <summary>Dense layers LoRA may adapt, by hub module path (e.g. <c>language_model.model.layers.0.self_attn.q_proj</c>).</summary>
    internal IReadOnlyDictionary<string, Linear> LinearsByName => _linearByName;
    internal int AdapterSlotCount => _adaptableLinears.Length;

    public int ImageSize => Config.Vision.ImageSize;
    public int NumImageTokens => Config.NumImageTokens;

    /// <summary>
    /// Opens a Hugging Face PaliGemma folder (config.json, model.safetensors or sharded safetensors with an index, tokenizer.model).
    /// Every tensor the model needs is checked for presence and shape; weights stay memory-mapped.
    /// </summary>
    /// <param name="tokenizerPath">tokenizer.model to use instead of the one in the folder (for weight-only folders).</param>
    public static PaliGemmaModel Load(string directory, string? tokenizerPath = null) =>
        Load(directory, new PaliGemmaLoadOptions { TokenizerPath = tokenizerPath });

    /// <summary>Opens a PaliGemma folder as <see cref="Load(string, string?)"/> does, optionally merging a LoRA adapter into it.</summary>
    public static PaliGemmaModel Load(string directory, PaliGemmaLoadOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        string? tokenizerPath = options.TokenizerPath;
        var clock = Stopwatch.StartNew();
        if (!System.IO.Directory.Exists(directory))
            throw new DirectoryNotFoundException($"'{directory}': model folder not found");
        var config = PaliGemmaConfig.Load(Path.Combine(directory, "config.json"));
        tokenizerPath ??= Path.Combine(directory, "tokenizer.model");
        if (!File.Exists(tokenizerPath))
            throw new FileNotFoundException($"'{tokenizerPath}': tokenizer.model not found (the SentencePiece model shipped with PaliGemma checkpoints)", tokenizerPath);
        var tokenizer = PaliGemmaTokenizer.Load(tokenizerPath);
        if (tokenizer.ImageTokenId != config.ImageTokenIndex)
            throw new InvalidDataException($"'{directory}': tokenizer.model maps <image> to {tokenizer.ImageTokenId} but config.json says image_token_index {config.ImageTokenIndex}");
        if (tokenizer.PieceCount > config.Text.VocabSize)
            throw new InvalidDataException($"'{directory}': tokenizer.model has {tokenizer.PieceCount} pieces but the embeddings have only {config.Text.VocabSize} rows");

        var checkpoint = SafetensorsCheckpoint.Open(directory);
        try
        {
            var model = new PaliGemmaModel(directory, config, checkpoint, tokenizer, TimeSpan.Zero);
            if (options.MergeAdapterDirectory is { } adapterDirectory)
            {
                var adapter = LoraAdapter.Load(adapterDirectory, model);
                adapter.MergeInto(model);
                model.MergedAdapter = adapter;
            }
            model.ApplyQuantization(checkpoint, options.QuantizeTo, options.QuantizeScales);
            if (options.Backend is { } backend && !ReferenceEquals(backend, Kernels.Backends.CpuBackend.Instance) || model.MergedAdapter is not null || model.Quantization is not null)
                model.Bind(options.Backend ?? Kernels.Backends.CpuBackend.Instance);
            model.LoadTime = clock.Elapsed;
            return model;
        }
        catch
        {
            checkpoint.Dispose();
            throw;
        }
    }

    /// <summary>Where the model computes (<see cref="PaliGemmaLoadOptions.Backend"/>; the CPU by default).</summary>
    public Kernels.Backends.IComputeBackend Backend => Decoder.Backend;

    /// <summary>Makes the final weights resident on <paramref name="backend"/> (after any merge or quantization).</summary>
    private void Bind(Kernels.Backends.IComputeBackend backend)
    {
        Vision.Bind(backend);
        Projector.Bind(backend);
        Decoder.Bind(backend);
    }

    /// <summary>The format of the Linear layers: stored in the checkpoint or chosen at load; null for float weights.</summary>
    public Quant.QuantFormat? Quantization { get; private set; }

    private void ApplyQuantization(SafetensorsCheckpoint checkpoint, Quant.QuantFormat? quantizeTo, Quant.ScaleSelection scales)
    {
        Quant.QuantFormat? stored = Quant.QuantizedCheckpoint.FormatOf(checkpoint);
        if (stored is { } s && quantizeTo is { } q && s != q)
            throw new InvalidDataException($"'{Directory}' is quantized to {Quant.QuantFormats.Name(s)}; it cannot be loaded as {Quant.QuantFormats.Name(q)}");
        Quantization = stored ?? quantizeTo;
        if (quantizeTo is not { } format || stored is not null)
            return;
        foreach (var linear in _adaptableLinears)
            linear.QuantizeWeight(format, scales);
        Decoder.QuantizeEmbedding(scales);
    }

    /// <summary>Pixel values [3, S, S] for one image, as the PaliGemma processor computes them.</summary>
    public float[] Preprocess(RgbImage image) => ImagePreprocessor.ToPixelValues(image, ImageSize);

    /// <summary>
    /// Image features for the decoder [B, image tokens, text hidden]: SigLIP, projector, then divided by sqrt(text hidden) as
    /// the reference does before the decoder multiplies all embeddings by sqrt(hidden).
    /// </summary>
    /// <param name="adapter">A run-time LoRA adapter loaded for this model (<see cref="LoadAdapter"/>), or null for the base weights.</param>
    public float[] EncodeImages(ReadOnlySpan<float> pixelValues, int images, VisionTrace? trace = null, CancellationToken cancellationToken = default,
        LoraAdapter? adapter = null, IProgress<InferenceProgress>? progress = null)
    {
        CheckAdapter(adapter);
        int tokens = NumImageTokens, vh = Config.Vision.HiddenSize, th = Config.Text.HiddenSize;
        var visionStates = new float[images * tokens * vh];
        Vision.Encode(pixelValues, images, visionStates, cancellationToken, adapter, progress);
        var features = new float[images * tokens * th];
        Projector.Forward(visionStates, images * tokens, features, adapter);
        if (trace is not null)
        {
            trace.LastHiddenState = visionStates;
            trace.ProjectorOutput = (float[])features.Clone();
        }
        float divisor = MathF.Sqrt(th);
        for (int i = 0; i < features.Length; i++) features[i] /= divisor;
        return features;
    }

    /// <summary>
    /// Loads a PEFT LoRA adapter folder for run-time use with this model, once: later calls with the same folder
    /// (compared by full path) return the same instance. Adapters are picked per request
    /// (<see cref="GenerationOptions.Adapter"/>, <see cref="PaliGemmaSession"/>); the base weights are shared.
    /// </summary>
    public LoraAdapter LoadAdapter(string adapterDirectory)
    {
        ArgumentException.ThrowIfNullOrEmpty(adapterDirectory);
        string key = Path.GetFullPath(adapterDirectory).TrimEnd(Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar);
        var lazy = _adapters.GetOrAdd(key, k => new Lazy<LoraAdapter>(() => LoraAdapter.Load(k, this)));
        try
        {
            return lazy.Value;
        }
        catch
        {
            // A failed load is not cached: the folder may be fixed and tried again.
            _adapters.TryRemove(new KeyValuePair<string, Lazy<LoraAdapter>>(key, lazy));
            throw;
        }
    }

    /// <summary>Throws unless <paramref name="adapter"/> is null or a run-time adapter loaded against this model.</summary>
    internal void CheckAdapter(LoraAdapter? adapter)
    {
        if (adapter is null) return;
        if (!ReferenceEquals(adapter.BaseModel, this))
            throw new ArgumentException($"LoRA adapter '{adapter.Directory}' was loaded for another model instance ('{adapter.BaseModel.Directory}'); load it with this model's LoadAdapter", nameof(adapter));
        if (ReferenceEquals(adapter, MergedAdapter))
            throw new ArgumentException($"LoRA adapter '{adapter.Directory}' is already merged into this model's weights; applying it again at run time would add it twice", nameof(adapter));
    }

    internal Linear AdaptableLinear(int slot) => _adaptableLinears[slot];

    /// <summary>Releases the mapped checkpoint. A device backend passed in the options stays the caller's to dispose.</summary>
    public void Dispose() => _checkpoint.Dispose();
}
