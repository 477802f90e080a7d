using System.Diagnostics;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Tasks;

namespace PaliGemma.Cli.Serve;

/// <summary>A request error answered with a status code and <c>{"error": message}</c>.</summary>
public sealed class RequestException(int statusCode, string message) : Exception(message)
{
    public int StatusCode { get; } = statusCode;
}

/// <summary>One generation to run: the decoded image, the full prompt and the decoding options.</summary>
internal sealed record InferenceJob(RgbImage Image, string Prompt, GenerationOptions Options);

/// <summary>A finished generation in the shape the CLI's task JSON writes, plus the time spent waiting for a slot.</summary>
internal sealed record InferenceOutcome(TaskResult Result, TimeSpan QueueWait);

/// <summary>
/// One loaded model shared by every request, behind a cap on concurrent generations. The model is immutable; each
/// generation builds its own <see cref="PaliGemmaGenerator"/> run (KV cache, sampler, decoder state), so requests never share state.
/// Requests beyond the cap wait in a bounded queue; past the queue they are refused with 503 (see <see cref="AcquireAsync"/>).
/// </summary>
internal sealed class InferenceEngine : IDisposable
{
    private readonly ServeOptions _options;
    private readonly SemaphoreSlim _slots;
    private readonly Lock _maskLock = new();
    private readonly Task<(PaliGemmaModel Model, MaskDecoder? Masks)> _loading;
    private int _admitted;   // running + waiting
    private int _running;
    private long _served;

    public InferenceEngine(ServeOptions options)
    {
        _options = options;
        _slots = new SemaphoreSlim(options.MaxConcurrency, options.MaxConcurrency);
        // Load off the request path so the port opens at once (platform start probes) and /healthz says "loading" until done.
        _loading = Task.Run(() =>
        {
            var masks = options.VaePath is null ? null : MaskDecoder.Load(options.VaePath);
            var model = PaliGemmaModel.Load(options.ModelDirectory, new PaliGemmaLoadOptions { TokenizerPath = options.TokenizerPath, Backend = CliBackend.Current });
            return (model, masks);
        });
    }

    /// <summary>Completes when the model is loaded; faults when loading failed.</summary>
    public Task Ready => _loading;

    public bool IsReady => _loading.IsCompletedSuccessfully;

    public PaliGemmaModel Model => IsReady ? _loading.Result.Model : throw new RequestException(503, LoadingMessage);

    public bool HasMaskDecoder => IsReady && _loading.Result.Masks is not null;

    public string LoadingMessage => _loading.IsFaulted
        ? $"the model failed to load: {_loading.Exception!.InnerException?.Message}"
        : "the model is still loading";

    public string ModelName => Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(_options.ModelDirectory)));

    public int Running => Volatile.Read(ref _running);
    public int Waiting => Math.Max(0, Volatile.Read(ref _admitted) - Running);
    public long Served => Interlocked.Read(ref _served);

    /// <summary>
    /// Waits for a generation slot. Throws 503 at once when <see cref="ServeOptions.MaxConcurrency"/> generations run and
    /// <see cref="ServeOptions.MaxQueue"/> more already wait: a serverless front end then retries or routes to another
    /// instance, instead of piling up requests that would time out anyway.
    /// </summary>
    public async Task<Slot> AcquireAsync(CancellationToken cancellationToken)
    {
        _ = Model;   // 503 while loading
        if (Interlocked.Increment(ref _admitted) > _options.MaxConcurrency + _options.MaxQueue)
        {
            Interlocked.Decrement(ref _admitted);
            throw new RequestException(503, $"server busy: {_options.MaxConcurrency} generations running and {_options.MaxQueue} waiting; retry later");
        }
        var clock = Stopwatch.StartNew();
        try
        {
            await _slots.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            Interlocked.Decrement(ref _admitted);
            throw;
        }
        Interlocked.Increment(ref _running);
        return new Slot(this, clock.Elapsed);
    }

    /// <summary>
    /// Runs the job on a pool thread (generation is CPU-bound and synchronous); tokens go to <paramref name="onToken"/>
    /// from that thread as they are produced. Detect/segment outputs are parsed into objects, masks decoded when a VAE is loaded.
    /// </summary>
    public Task<InferenceOutcome> RunAsync(Slot slot, InferenceJob job, Action<GeneratedToken>? onToken, CancellationToken cancellationToken) =>
        Task.Run(() =>
        {
            var (model, masks) = _loading.Result;
            var generated = new PaliGemmaGenerator(model).Generate(new GenerationRequest(job.Image, job.Prompt), job.Options, onToken, cancellationToken);
            var task = TaskPrompts.TaskOf(job.Prompt);
            IReadOnlyList<DetectedObject> objects = task is PaliGemmaTask.Detect or PaliGemmaTask.Segment
                ? OutputParser.Parse(generated.Text, job.Image.Width, job.Image.Height)
                : [];
            var maskClock = Stopwatch.StartNew();
            if (masks is not null && task == PaliGemmaTask.Segment)
            {
                lock (_maskLock) PaliGemmaTasks.DecodeMasks(objects, masks);   // the decoder is not documented as thread-safe
            }
            var result = new TaskResult
            {
                Task = task,
                Prompt = job.Prompt,
                Text = generated.Text,
                Objects = objects,
                ImageWidth = job.Image.Width,
                ImageHeight = job.Image.Height,
                PromptIds = generated.PromptIds,
                GeneratedIds = generated.GeneratedIds,
                StoppedAtEos = generated.StoppedAtEos,
                Timings = generated.Timings,
                MaskDecode = maskClock.Elapsed,
            };
            Interlocked.Increment(ref _served);
            return new InferenceOutcome(result, slot.QueueWait);
        }, CancellationToken.None);

    /// <summary>Checks that the prompt plus the new tokens fit the model's positions, before a slot is taken.</summary>
    public int CountPromptTokens(string prompt, int maxNewTokens)
    {
        var model = Model;
        int tokens = model.Tokenizer.BuildPrompt(prompt, model.NumImageTokens).Length;
        int positions = model.Config.Text.MaxPositionEmbeddings;
        if (tokens + maxNewTokens > positions)
            throw new RequestException(400, $"prompt too long: {tokens} prompt tokens ({model.NumImageTokens} of them image tokens) plus max_new_tokens {maxNewTokens} exceed the model's {positions} positions");
        return tokens;
    }

    public void Dispose()
    {
        if (_loading.IsCompletedSuccessfully) _loading.Result.Model.Dispose();
        _slots.Dispose();
    }

    /// <summary>A held generation slot; disposing it lets the next waiting request run.</summary>
    internal sealed class Slot(InferenceEngine engine, TimeSpan queueWait) : IDisposable
    {
        private int _released;
        public TimeSpan QueueWait { get; } = queueWait;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _released, 1) != 0) return;
            Interlocked.Decrement(ref engine._running);
            Interlocked.Decrement(ref engine._admitted);
            engine._slots.Release();
        }
    }
}
