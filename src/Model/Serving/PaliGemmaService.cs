using System.Diagnostics;
using System.Runtime.CompilerServices;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Tasks;
using PaliGemma.CpuOnly.Model.Text;

namespace PaliGemma.CpuOnly.Model.Serving;

/// <summary>
/// One loaded model serving any number of concurrent requests, for hosts such as web servers and serverless functions:
/// load once, share across threads. The model is immutable; each request runs in its own <see cref="PaliGemmaSession"/>
/// over a KV cache taken from a pool. At most <see cref="PaliGemmaServiceOptions.MaxConcurrentSessions"/> requests hold a
/// session at once and their caches stay within <see cref="PaliGemmaServiceOptions.MaxKvCacheBytes"/>; other requests
/// wait asynchronously, in arrival order, and may be cancelled while they wait.
/// </summary>
/// <remarks>
/// Results depend only on the request and its options (image, prompt, sampling seed, adapter), never on how many other
/// requests run beside it: each request samples with its own generator seeded from <see cref="SamplingOptions.Seed"/>,
/// and its cache size is derived from the request alone. Cancellation is checked between generated tokens and between
/// the layers of the vision tower and of the prompt's prefill.
/// </remarks>
public sealed class PaliGemmaService : IAsyncDisposable
{
    private readonly bool _ownsModel;
    private readonly KvCachePool _pool;
    private readonly CancellationTokenSource _shutdown = new();
    private readonly long[] _layerBytesPerPosition;   // per layer: bytes of keys and values for one position (window ignored)
    private int _disposed;

    /// <summary>Serves an already loaded model; it is disposed with the service only when <paramref name="ownsModel"/> is set.</summary>
    public PaliGemmaService(PaliGemmaModel model, PaliGemmaServiceOptions? options = null, bool ownsModel = false)
    {
        ArgumentNullException.ThrowIfNull(model);
        options ??= new PaliGemmaServiceOptions();
        options.Validate();
        Model = model;
        Options = options;
        _ownsModel = ownsModel;
        var text = model.Config.Text;
        _layerBytesPerPosition = new long[text.NumHiddenLayers];
        Array.Fill(_layerBytesPerPosition, 2L * model.Decoder.KvWidth * sizeof(float));
        _pool = new KvCachePool(options.MaxConcurrentSessions, options.MaxKvCacheBytes,
            capacity => model.Decoder.CreateCache(1, capacity), KvCacheBytes);
    }

    /// <summary>Loads the checkpoint in <paramref name="directory"/> on a pool thread and serves it; the service owns the model.</summary>
    public static Task<PaliGemmaService> LoadAsync(string directory, PaliGemmaServiceOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        options ??= new PaliGemmaServiceOptions();
        options.Validate();
        return Task.Run(() => new PaliGemmaService(PaliGemmaModel.Load(directory, options.LoadOptions), options, ownsModel: true), cancellationToken);
    }

    public PaliGemmaModel Model { get; }
    public PaliGemmaServiceOptions Options { get; }

    /// <summary>Requests holding a session right now (never more than <see cref="PaliGemmaServiceOptions.MaxConcurrentSessions"/>).</summary>
    public int ActiveSessions => _pool.ActiveSessions;
    /// <summary>Requests waiting for a session or for KV cache room.</summary>
    public int WaitingRequests => _pool.WaitingRequests;
    /// <summary>KV cache bytes held by running sessions.</summary>
    public long KvCacheBytesInUse => _pool.ActiveBytes;
    /// <summary>KV cache bytes kept by idle caches for reuse (dropped when a request needs the room).</summary>
    public long KvCacheBytesIdle => _pool.IdleBytes;

    /// <summary>Positions of the KV cache a request gets: its prompt plus new tokens, rounded up to the capacity step.</summary>
    public int KvCacheCapacityFor(GenerationRequest request, GenerationOptions? options = null) =>
        CapacityFor(BuildPrompt(request).Length, options ?? new GenerationOptions());

    /// <summary>Bytes of keys and values a KV cache of <paramref name="capacity"/> positions takes for one sequence.</summary>
    public long KvCacheBytes(int capacity)
    {
        long total = 0;
        for (int l = 0; l < _layerBytesPerPosition.Length; l++)
        {
            int window = Model.Config.Text.LayerWindow(l);
            int slots = window == 0 ? capacity : Math.Min(window, capacity);
            total += _layerBytesPerPosition[l] * slots;
        }
        return total;
    }

    /// <summary>Runs one request to the end and returns its tokens, text and timings.</summary>
    /// <exception cref="ArgumentException">The prompt is too long for the model, or its KV cache alone exceeds <see cref="PaliGemmaServiceOptions.MaxKvCacheBytes"/>.</exception>
    /// <exception cref="OperationCanceledException"><paramref name="cancellationToken"/> was cancelled, or the service was disposed mid-request.</exception>
    public async Task<GenerationResult> GenerateAsync(GenerationRequest request, GenerationOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= new GenerationOptions();
        var (prompt, capacity) = Prepare(request, options);
        var record = new Record(options.KeepStepLogits);
        await foreach (var _ in RunAsync(request, options, prompt, capacity, record, cancellationToken).ConfigureAwait(false))
        {
        }
        var tokenizer = Model.Tokenizer;
        int[] generated = [.. record.Generated];
        int textLength = generated.Length > 0 && generated[^1] == tokenizer.EosId ? generated.Length - 1 : generated.Length;
        return new GenerationResult
        {
            PromptIds = prompt,
            GeneratedIds = generated,
            Text = tokenizer.Decode(generated.AsSpan(0, textLength)),
            Timings = record.Timings,
            StepLogits = record.StepLogits,
            EosId = tokenizer.EosId,
        };
    }

    /// <summary>
    /// Streams the request's tokens as they are produced; the last one has <see cref="GeneratedToken.IsEnd"/> when the model
    /// stopped by itself. The concatenated <see cref="GeneratedToken.Text"/> equals the text <see cref="GenerateAsync"/> returns.
    /// The session is held until the enumeration ends or is disposed (leaving an <c>await foreach</c> early gives it back);
    /// the next token is computed only when the consumer asks for it.
    /// </summary>
    /// <remarks>Arguments are checked when this is called; waiting for a session starts with the first MoveNextAsync.</remarks>
    public IAsyncEnumerable<GeneratedToken> StreamAsync(GenerationRequest request, GenerationOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= new GenerationOptions();
        var (prompt, capacity) = Prepare(request, options);
        return RunAsync(request, options, prompt, capacity, record: null, cancellationToken);
    }

    /// <summary>
    /// Runs a PaliGemma task prompt (caption, answer, detect, segment, ocr; see <see cref="TaskPrompts"/>) as
    /// <see cref="PaliGemmaTasks.Run"/> does, under the service's limits: detect and segment outputs are parsed into
    /// objects, and segment masks are decoded when <paramref name="maskDecoder"/> is given (it is safe to share).
    /// </summary>
    public async Task<TaskResult> RunTaskAsync(RgbImage image, string prompt, GenerationOptions? options = null, MaskDecoder? maskDecoder = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(image);
        ArgumentNullException.ThrowIfNull(prompt);
        var generated = await GenerateAsync(new GenerationRequest(image, prompt), options, cancellationToken).ConfigureAwait(false);
        return PaliGemmaTasks.ToTaskResult(image, prompt, generated, maskDecoder);
    }

    /// <summary>
    /// Fails waiting requests (<see cref="ObjectDisposedException"/>), cancels running ones (<see cref="OperationCanceledException"/>
    /// at their next check), waits for every session to be given back, then disposes an owned model.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        // Waiting requests fail with ObjectDisposedException first; running ones then see their cancellation.
        var drained = _pool.CloseAsync();
        _shutdown.Cancel();
        await drained.ConfigureAwait(false);
        if (_ownsModel) Model.Dispose();
    }

    private (int[] Prompt, int Capacity) Prepare(GenerationRequest request, GenerationOptions options)
    {
        ArgumentNullException.ThrowIfNull(request);
        ArgumentNullException.ThrowIfNull(options);
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        options.Validate();
        Model.CheckAdapter(options.Adapter);
        int[] prompt = BuildPrompt(request);
        return (prompt, CapacityFor(prompt.Length, options));
    }

    private int[] BuildPrompt(GenerationRequest request)
    {
        ArgumentNullException.ThrowIfNull(request);
        ArgumentNullException.ThrowIfNull(request.Image, nameof(request.Image));
        ArgumentNullException.ThrowIfNull(request.Prompt, nameof(request.Prompt));
        return Model.Tokenizer.BuildPrompt(request.Prompt, Model.NumImageTokens);
    }

    private int CapacityFor(int promptTokens, GenerationOptions options)
    {
        int limit = Model.Config.Text.MaxPositionEmbeddings;
        long needed = (long)promptTokens + options.MaxNewTokens;
        if (needed > limit)
            throw new ArgumentException($"the prompt ({promptTokens} tokens with {Model.NumImageTokens} image tokens) plus {options.MaxNewTokens} new tokens exceeds the model's {limit} positions", "request");
        long step = Options.KvCacheCapacityStep;
        long rounded = (needed + step - 1) / step * step;
        // The rounded size, unless it alone breaks the memory cap where the exact size would not.
        int capacity = (int)Math.Min(rounded, limit);
        if (KvCacheBytes(capacity) > Options.MaxKvCacheBytes) capacity = (int)needed;
        return capacity;
    }

    private async IAsyncEnumerable<GeneratedToken> RunAsync(GenerationRequest request, GenerationOptions options, int[] prompt, int capacity,
        Record? record, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, _shutdown.Token);
        var token = linked.Token;
        using var lease = await _pool.RentAsync(capacity, token).ConfigureAwait(false);

        var model = Model;
        var tokenizer = model.Tokenizer;
        var session = new PaliGemmaSession(model, lease.Cache, options.Adapter);
        var logits = new float[session.VocabSize];
        var timings = record?.Timings;
        await Task.Run(() => Prefill(request, options, prompt, session, logits, timings, token), token).ConfigureAwait(false);

        var sampler = new TokenSampler(options.Sampling);
        var text = new StreamingDecoder(tokenizer);
        var next = new int[1];
        for (int step = 0; step < options.MaxNewTokens; step++)
        {
            record?.StepLogits?.Add(logits.ToArray());
            int id = sampler.Next(logits);
            record?.Generated.Add(id);
            bool end = id == tokenizer.EosId;
            yield return new GeneratedToken(0, step, id, end ? text.Flush() : text.Push(id), end);
            if (end || step + 1 == options.MaxNewTokens) yield break;

            token.ThrowIfCancellationRequested();
            next[0] = id;
            await Task.Run(() =>
            {
                long started = Stopwatch.GetTimestamp();
                session.Decode(next, logits, token);
                timings?.DecodeSteps.Add(Stopwatch.GetElapsedTime(started));
            }, token).ConfigureAwait(false);
        }
    }

    private void Prefill(GenerationRequest request, GenerationOptions options, int[] prompt, PaliGemmaSession session, float[] logits,
        GenerationTimings? timings, CancellationToken cancellationToken)
    {
        var model = Model;
        long started = Stopwatch.GetTimestamp();
        float[] pixels = model.Preprocess(request.Image);
        if (timings is not null) timings.Preprocess = Stopwatch.GetElapsedTime(started);

        started = Stopwatch.GetTimestamp();
        float[] features = model.EncodeImages(pixels, 1, null, cancellationToken, options.Adapter, options.Progress);
        if (timings is not null) timings.Vision = Stopwatch.GetElapsedTime(started);

        started = Stopwatch.GetTimestamp();
        session.Prefill(prompt, default, prompt.Length, features, logits, new PrefillOptions { Progress = options.Progress }, cancellationToken);
        if (timings is not null) timings.Prefill = Stopwatch.GetElapsedTime(started);
    }

    /// <summary>What <see cref="GenerateAsync"/> keeps of a run.</summary>
    private sealed class Record(bool keepStepLogits)
    {
        public List<int> Generated { get; } = [];
        public List<float[]>? StepLogits { get; } = keepStepLogits ? [] : null;
        public GenerationTimings Timings { get; } = new();
    }
}
