using PaliGemma.CpuOnly.Model.Lora;

namespace PaliGemma.CpuOnly.Model;

/// <summary>Options for <see cref="PaliGemmaSession.Prefill"/>.</summary>
public sealed class PrefillOptions
{
    /// <summary>Explicit rotary positions [rows·tokens]; by default generate-style positions: the count of real tokens so far (1-based), pads 2.</summary>
    public int[]? Positions { get; init; }
    /// <summary>Length of the bidirectional prefix; later tokens attend causally (training-style scoring). Default: the whole input.</summary>
    public int? PrefixLength { get; init; }
    /// <summary>Compute logits for every position instead of only the last one.</summary>
    public bool AllLogits { get; init; }
    public HiddenStateObserver? Observer { get; init; }
    /// <summary>Told after each decoder layer of the prompt (long prompts of big models take seconds).</summary>
    public IProgress<InferenceProgress>? Progress { get; init; }
}

/// <summary>
/// The per-request state of a generation: a KV cache for a batch of left-padded rows and each row's position counter.
/// One session serves one request at a time; the model it reads is shared.
/// </summary>
public sealed class PaliGemmaSession
{
    private readonly PaliGemmaModel _model;
    private readonly KvCache _cache;
    private readonly int[] _realTokens;   // real (non-pad) tokens per row so far
    private float[] _decodeHidden = [];
    private int[] _decodePositions = [];

    /// <param name="adapter">
    /// A run-time LoRA adapter loaded for <paramref name="model"/> that this request uses, or null for the base weights.
    /// Encode the request's images with the same adapter (<see cref="PaliGemmaModel.EncodeImages"/>): it adapts the vision tower too.
    /// </param>
    public PaliGemmaSession(PaliGemmaModel model, int batch, int capacity, LoraAdapter? adapter = null)
    {
        model.CheckAdapter(adapter);
        _model = model;
        Adapter = adapter;
        _cache = model.Decoder.CreateCache(batch, capacity);
        _realTokens = new int[batch];
    }

    /// <summary>
    /// A session over a cache the caller owns (for example one taken from a pool): the cache is reset here and must have
    /// been made by this model's <see cref="GemmaDecoder.CreateCache"/> (same layers, key width and sliding windows).
    /// </summary>
    public PaliGemmaSession(PaliGemmaModel model, KvCache cache, LoraAdapter? adapter = null)
    {
        ArgumentNullException.ThrowIfNull(cache);
        model.CheckAdapter(adapter);
        var text = model.Config.Text;
        if (cache.Layers != text.NumHiddenLayers || cache.KvWidth != model.Decoder.KvWidth)
            throw new ArgumentException($"the cache was made for {cache.Layers} layers of {cache.KvWidth} floats, not this model's {text.NumHiddenLayers} of {model.Decoder.KvWidth}", nameof(cache));
        for (int l = 0; l < cache.Layers; l++)
        {
            if (cache.Window(l) != text.LayerWindow(l))
                throw new ArgumentException($"the cache's layer {l} has sliding window {cache.Window(l)}, the model's {text.LayerWindow(l)}", nameof(cache));
        }
        _model = model;
        Adapter = adapter;
        _cache = cache;
        _cache.Reset();
        _realTokens = new int[cache.Batch];
    }

    public int Batch => _cache.Batch;
    public int Capacity => _cache.Capacity;
    public int Length => _cache.Length;
    public int VocabSize => _model.Decoder.VocabSize;
    public KvCache Cache => _cache;
    /// <summary>The run-time LoRA adapter every forward of this session applies, or null.</summary>
    public LoraAdapter? Adapter { get; }

    /// <summary>
    /// Runs the prompt: <paramref name="ids"/> and <paramref name="mask"/> are [rows, tokens] (left-padded, mask 0 on pads);
    /// <paramref name="imageFeatures"/> [rows, image tokens, hidden] replace the <c>&lt;image&gt;</c> tokens of each row in order.
    /// <paramref name="logits"/> receives [rows, vocab] for the last position, or [rows·tokens, vocab] with <see cref="PrefillOptions.AllLogits"/>.
    /// </summary>
    public void Prefill(ReadOnlySpan<int> ids, ReadOnlySpan<byte> mask, int tokens, ReadOnlySpan<float> imageFeatures, Span<float> logits,
        PrefillOptions? options = null, CancellationToken cancellationToken = default)
    {
        var decoder = _model.Decoder;
        int batch = Batch, h = decoder.Config.HiddenSize, rows = batch * tokens, imageTokens = _model.NumImageTokens;
        if (_cache.Length != 0) throw new InvalidOperationException("Prefill must be the first call on a session (call Reset to reuse it)");
        if (ids.Length != rows) throw new ArgumentException($"{ids.Length} ids for {batch} row(s) of {tokens} tokens", nameof(ids));
        if (!mask.IsEmpty && mask.Length != rows) throw new ArgumentException($"attention mask holds {mask.Length} entries for {rows} tokens", nameof(mask));
        if (tokens > Capacity) throw new ArgumentException($"the prompt has {tokens} tokens but the session holds {Capacity}", nameof(tokens));
        int logitRows = options?.AllLogits == true ? rows : batch;
        if (logits.Length != logitRows * VocabSize) throw new ArgumentException($"logits hold {logits.Length} floats, {logitRows * VocabSize} needed", nameof(logits));

        var hidden = new float[rows * h];
        var positions = new int[rows];
        int imageId = _model.Config.ImageTokenIndex;
        for (int b = 0; b < batch; b++)
        {
            int imageIndex = 0;
            for (int t = 0; t < tokens; t++)
            {
                int row = b * tokens + t;
                bool real = mask.IsEmpty || mask[row] != 0;
                _cache.Valid[b * Capacity + t] = real ? (byte)1 : (byte)0;
                if (real) _realTokens[b]++;
                positions[row] = real ? _realTokens[b] : 2;   // the reference fills pad positions with 1, then adds 1
                var dst = hidden.AsSpan(row * h, h);
                if (ids[row] == imageId)
                {
                    if (imageIndex >= imageTokens)
                        throw new ArgumentException($"row {b} holds more than {imageTokens} <image> tokens", nameof(ids));
                    int src = (b * imageTokens + imageIndex++) * h;
                    if (src + h > imageFeatures.Length)
                        throw new ArgumentException($"image features hold {imageFeatures.Length} floats, too few for row {b}", nameof(imageFeatures));
                    for (int i = 0; i < h; i++) dst[i] = imageFeatures[src + i] * decoder.EmbeddingScale;
                }
                else
                {
                    decoder.EmbedToken(ids[row], dst);
                }
            }
            if (imageIndex != imageTokens && imageIndex != 0)
                throw new ArgumentException($"row {b} holds {imageIndex} <image> tokens; the model expects {imageTokens}", nameof(ids));
        }
        if (options?.Positions is { } explicitPositions)
        {
            if (explicitPositions.Length != rows) throw new ArgumentException($"{explicitPositions.Length} positions for {rows} tokens", nameof(options));
            explicitPositions.CopyTo(positions, 0);
        }

        decoder.Forward(hidden, tokens, positions, _cache, options?.PrefixLength ?? tokens, options?.Observer, cancellationToken, Adapter, options?.Progress);
        if (logitRows == rows)
        {
            decoder.Logits(hidden, rows, logits, _cache);
        }
        else
        {
            var last = new float[batch * h];
            for (int b = 0; b < batch; b++) hidden.AsSpan(((b + 1) * tokens - 1) * h, h).CopyTo(last.AsSpan(b * h));
            decoder.Logits(last, batch, logits, _cache);
        }
    }

    /// <summary>Appends one token per row and writes the next-token logits [rows, vocab].</summary>
    public void Decode(ReadOnlySpan<int> nextTokens, Span<float> logits, CancellationToken cancellationToken = default)
    {
        var decoder = _model.Decoder;
        int batch = Batch, h = decoder.Config.HiddenSize;
        if (nextTokens.Length != batch) throw new ArgumentException($"{nextTokens.Length} tokens for {batch} row(s)", nameof(nextTokens));
        if (logits.Length != batch * VocabSize) throw new ArgumentException($"logits hold {logits.Length} floats, {batch * VocabSize} needed", nameof(logits));
        if (_cache.Length >= Capacity) throw new InvalidOperationException($"the session is full ({Capacity} positions)");
        if (_decodeHidden.Length != batch * h)
        {
            _decodeHidden = new float[batch * h];
            _decodePositions = new int[batch];
        }
        int position = _cache.Length;
        for (int b = 0; b < batch; b++)
        {
            _cache.Valid[b * Capacity + position] = 1;
            _decodePositions[b] = ++_realTokens[b];
            decoder.EmbedToken(nextTokens[b], _decodeHidden.AsSpan(b * h, h));
        }
        decoder.Forward(_decodeHidden, 1, _decodePositions, _cache, prefixLength: 0, observer: null, cancellationToken, Adapter);
        decoder.Logits(_decodeHidden, batch, logits, _cache);
    }

    public void Reset()
    {
        _cache.Reset();
        Array.Clear(_realTokens);
    }
}
