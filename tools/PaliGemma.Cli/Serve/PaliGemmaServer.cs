using System.Buffers;
using System.Diagnostics;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Threading.Channels;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.AspNetCore.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using PaliGemma.CpuOnly.Model;

namespace PaliGemma.Cli.Serve;

/// <summary>
/// The HTTP front end of <c>paligemma serve</c> on ASP.NET Core's slim host (NativeAOT-compatible: plain request
/// delegates, JSON read with <see cref="JsonDocument"/> and written with <see cref="Utf8JsonWriter"/>).
/// Endpoints: <c>POST /v1/generate</c> (multipart), <c>POST /v1/chat/completions</c> (OpenAI style), <c>GET /v1/models</c>, <c>GET /healthz</c>.
/// </summary>
public sealed class PaliGemmaServer : IAsyncDisposable
{
    internal static readonly JsonWriterOptions WriterOptions = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    private readonly InferenceEngine _engine;
    private readonly ServeOptions _options;

    private PaliGemmaServer(WebApplication app, InferenceEngine engine, ServeOptions options)
    {
        App = app;
        _engine = engine;
        _options = options;
    }

    public WebApplication App { get; }

    /// <summary>Completes when the model is loaded (faults when it could not be); requests get 503 until then.</summary>
    public Task ModelReady => _engine.Ready;

    /// <summary>The bound addresses, with the real port when port 0 was asked for (after <see cref="StartAsync"/>).</summary>
    public ICollection<string> Urls => App.Urls;

    /// <summary>Builds the host and starts loading the model in the background; call <see cref="StartAsync"/> to listen.</summary>
    public static PaliGemmaServer Create(ServeOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [] });
        builder.WebHost.UseUrls([.. options.Urls]);
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.Limits.MaxRequestBodySize = options.MaxRequestBytes;
            k.AddServerHeader = false;
        });
        builder.Services.Configure<HostOptions>(h => h.ShutdownTimeout = options.ShutdownTimeout);
        builder.Logging.SetMinimumLevel(options.Quiet ? LogLevel.Error : LogLevel.Warning);
        if (!options.Quiet) builder.Logging.AddFilter("Microsoft.Hosting.Lifetime", LogLevel.Information);

        var engine = new InferenceEngine(options);
        var app = builder.Build();
        var server = new PaliGemmaServer(app, engine, options);
        app.MapGet("/healthz", (RequestDelegate)server.HealthAsync);
        app.MapGet("/v1/models", (RequestDelegate)server.ModelsAsync);
        app.MapPost("/v1/generate", server.Guard(server.GenerateAsync));
        app.MapPost("/v1/chat/completions", server.Guard(server.ChatCompletionsAsync));
        return server;
    }

    public Task StartAsync(CancellationToken cancellationToken = default) => App.StartAsync(cancellationToken);

    /// <summary>Stops listening and waits for in-flight requests (up to <see cref="ServeOptions.ShutdownTimeout"/>).</summary>
    public Task StopAsync(CancellationToken cancellationToken = default) => App.StopAsync(cancellationToken);

    public async ValueTask DisposeAsync()
    {
        await App.DisposeAsync().ConfigureAwait(false);
        _engine.Dispose();
    }

    // ---- endpoints ----

    private Task HealthAsync(HttpContext context)
    {
        if (!_engine.IsReady)
        {
            return WriteJsonAsync(context, 503, w =>
            {
                w.WriteStartObject();
                w.WriteString("status", _engine.Ready.IsFaulted ? "failed" : "loading");
                w.WriteString("error", _engine.LoadingMessage);
                w.WriteEndObject();
            });
        }
        var model = _engine.Model;
        var c = model.Config;
        return WriteJsonAsync(context, 200, w =>
        {
            w.WriteStartObject();
            w.WriteString("status", "ok");
            w.WriteString("model", _engine.ModelName);
            w.WriteStartObject("config");
            w.WriteString("text_model_type", c.Text.ModelType);
            w.WriteNumber("image_size", c.Vision.ImageSize);
            w.WriteNumber("num_image_tokens", c.NumImageTokens);
            w.WriteNumber("vision_layers", c.Vision.NumHiddenLayers);
            w.WriteNumber("vision_hidden_size", c.Vision.HiddenSize);
            w.WriteNumber("text_layers", c.Text.NumHiddenLayers);
            w.WriteNumber("text_hidden_size", c.Text.HiddenSize);
            w.WriteNumber("vocab_size", c.Text.VocabSize);
            w.WriteNumber("max_position_embeddings", c.Text.MaxPositionEmbeddings);
            w.WriteEndObject();
            w.WriteBoolean("mask_decoder", _engine.HasMaskDecoder);
            w.WriteNumber("load_ms", Math.Round(model.LoadTime.TotalMilliseconds, 3));
            w.WriteNumber("max_concurrency", _options.MaxConcurrency);
            w.WriteNumber("max_queue", _options.MaxQueue);
            w.WriteNumber("max_request_bytes", _options.MaxRequestBytes);
            w.WriteNumber("running", _engine.Running);
            w.WriteNumber("waiting", _engine.Waiting);
            w.WriteNumber("served", _engine.Served);
            // Memory figures for soak tests and dashboards: RSS, the managed heap after the last GC, and GC counts.
            var gc = GC.GetGCMemoryInfo();
            w.WriteStartObject("process");
            w.WriteNumber("working_set_bytes", Environment.WorkingSet);
            w.WriteNumber("gc_heap_bytes", gc.HeapSizeBytes);
            w.WriteNumber("gc_committed_bytes", gc.TotalCommittedBytes);
            w.WriteNumber("gc_gen0_collections", GC.CollectionCount(0));
            w.WriteNumber("gc_gen2_collections", GC.CollectionCount(2));
            w.WriteNumber("thread_pool_threads", ThreadPool.ThreadCount);
            w.WriteEndObject();
            w.WriteEndObject();
        });
    }

    private Task ModelsAsync(HttpContext context) => WriteJsonAsync(context, 200, w =>
    {
        w.WriteStartObject();
        w.WriteString("object", "list");
        w.WriteStartArray("data");
        w.WriteStartObject();
        w.WriteString("id", _engine.ModelName);
        w.WriteString("object", "model");
        w.WriteNumber("created", 0);
        w.WriteString("owned_by", "paligemma-cpuonly");
        w.WriteEndObject();
        w.WriteEndArray();
        w.WriteEndObject();
    });

    private async Task GenerateAsync(HttpContext context, Stopwatch clock)
    {
        var parsed = await GenerateRequest.ReadAsync(context, _options, _engine.Model, context.RequestAborted).ConfigureAwait(false);
        _engine.CountPromptTokens(parsed.Job.Prompt, parsed.Job.Options.MaxNewTokens);
        using var slot = await _engine.AcquireAsync(context.RequestAborted).ConfigureAwait(false);
        if (_options.BeforeGenerate is { } hook) await hook(context.RequestAborted).ConfigureAwait(false);

        if (!parsed.Stream)
        {
            var outcome = await _engine.RunAsync(slot, parsed.Job, null, context.RequestAborted).ConfigureAwait(false);
            await WriteJsonAsync(context, 200, w => WriteGenerateResult(w, outcome, clock)).ConfigureAwait(false);
            Log(context, 200, clock, outcome);
            return;
        }

        StartEventStream(context);
        var streamed = new StringBuilder();
        var outcomeOrError = await StreamAsync(context, slot, parsed.Job, async token =>
        {
            streamed.Append(token.Text);
            await WriteEventAsync(context, "token", w =>
            {
                w.WriteStartObject();
                w.WriteNumber("step", token.Step);
                w.WriteNumber("id", token.Id);
                w.WriteString("text", token.Text);
                w.WriteBoolean("end", token.IsEnd);
                w.WriteEndObject();
            }).ConfigureAwait(false);
        }).ConfigureAwait(false);
        if (outcomeOrError is not { } streamedOutcome) return;
        string rest = Remainder(streamedOutcome.Result.Text, streamed);
        if (rest.Length > 0)
        {
            // Generation stopped inside a multi-byte character: its replacement text has no token of its own.
            await WriteEventAsync(context, "token", w =>
            {
                w.WriteStartObject();
                w.WriteNull("step");
                w.WriteNull("id");
                w.WriteString("text", rest);
                w.WriteBoolean("end", false);
                w.WriteEndObject();
            }).ConfigureAwait(false);
        }
        await WriteEventAsync(context, "result", w => WriteGenerateResult(w, streamedOutcome, clock)).ConfigureAwait(false);
        Log(context, 200, clock, streamedOutcome);
    }

    private void WriteGenerateResult(Utf8JsonWriter w, InferenceOutcome outcome, Stopwatch clock)
    {
        w.WriteStartObject();
        w.WriteString("model", _engine.ModelName);
        TaskJson.WriteResult(w, outcome.Result, -1, clock.Elapsed.TotalMilliseconds);
        TaskJson.WriteInts(w, "prompt_ids", outcome.Result.PromptIds);
        w.WriteNumber("queue_ms", Math.Round(outcome.QueueWait.TotalMilliseconds, 3));
        w.WriteEndObject();
    }

    private async Task ChatCompletionsAsync(HttpContext context, Stopwatch clock)
    {
        var chat = await ChatRequest.ReadAsync(context, _options, _engine.Model, context.RequestAborted).ConfigureAwait(false);
        int promptTokens = _engine.CountPromptTokens(chat.Job.Prompt, chat.Job.Options.MaxNewTokens);
        using var slot = await _engine.AcquireAsync(context.RequestAborted).ConfigureAwait(false);
        if (_options.BeforeGenerate is { } hook) await hook(context.RequestAborted).ConfigureAwait(false);
        string id = "chatcmpl-" + Guid.NewGuid().ToString("N");
        long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        string model = _engine.ModelName;

        if (!chat.Stream)
        {
            var outcome = await _engine.RunAsync(slot, chat.Job, null, context.RequestAborted).ConfigureAwait(false);
            var r = outcome.Result;
            await WriteJsonAsync(context, 200, w =>
            {
                w.WriteStartObject();
                WriteChatHeader(w, id, "chat.completion", created, model);
                w.WriteStartArray("choices");
                w.WriteStartObject();
                w.WriteNumber("index", 0);
                w.WriteStartObject("message");
                w.WriteString("role", "assistant");
                w.WriteString("content", r.Text);
                w.WriteEndObject();
                w.WriteNull("logprobs");
                w.WriteString("finish_reason", r.StoppedAtEos ? "stop" : "length");
                w.WriteEndObject();
                w.WriteEndArray();
                WriteUsage(w, promptTokens, r.GeneratedIds.Length);
                w.WriteEndObject();
            }).ConfigureAwait(false);
            Log(context, 200, clock, outcome);
            return;
        }

        StartEventStream(context);
        var streamed = new StringBuilder();
        await WriteChunkAsync(context, id, created, model, "", role: true, finishReason: null).ConfigureAwait(false);
        var outcomeOrError = await StreamAsync(context, slot, chat.Job, async token =>
        {
            if (token.Text.Length == 0) return;
            streamed.Append(token.Text);
            await WriteChunkAsync(context, id, created, model, token.Text, role: false, finishReason: null).ConfigureAwait(false);
        }).ConfigureAwait(false);
        if (outcomeOrError is not { } done) return;
        string rest = Remainder(done.Result.Text, streamed);
        if (rest.Length > 0) await WriteChunkAsync(context, id, created, model, rest, role: false, finishReason: null).ConfigureAwait(false);
        await WriteChunkAsync(context, id, created, model, null, role: false, done.Result.StoppedAtEos ? "stop" : "length").ConfigureAwait(false);
        if (chat.IncludeUsage)
        {
            await WriteEventAsync(context, null, w =>
            {
                w.WriteStartObject();
                WriteChatHeader(w, id, "chat.completion.chunk", created, model);
                w.WriteStartArray("choices");
                w.WriteEndArray();
                WriteUsage(w, promptTokens, done.Result.GeneratedIds.Length);
                w.WriteEndObject();
            }).ConfigureAwait(false);
        }
        await WriteRawEventAsync(context, "data: [DONE]\n\n"u8.ToArray()).ConfigureAwait(false);
        Log(context, 200, clock, done);
    }

    private static void WriteChatHeader(Utf8JsonWriter w, string id, string type, long created, string model)
    {
        w.WriteString("id", id);
        w.WriteString("object", type);
        w.WriteNumber("created", created);
        w.WriteString("model", model);
    }

    private static void WriteUsage(Utf8JsonWriter w, int promptTokens, int completionTokens)
    {
        w.WriteStartObject("usage");
        w.WriteNumber("prompt_tokens", promptTokens);
        w.WriteNumber("completion_tokens", completionTokens);
        w.WriteNumber("total_tokens", promptTokens + completionTokens);
        w.WriteEndObject();
    }

    private static Task WriteChunkAsync(HttpContext context, string id, long created, string model, string? content, bool role, string? finishReason) =>
        WriteEventAsync(context, null, w =>
        {
            w.WriteStartObject();
            WriteChatHeader(w, id, "chat.completion.chunk", created, model);
            w.WriteStartArray("choices");
            w.WriteStartObject();
            w.WriteNumber("index", 0);
            w.WriteStartObject("delta");
            if (role) w.WriteString("role", "assistant");
            if (content is not null) w.WriteString("content", content);
            w.WriteEndObject();
            w.WriteNull("logprobs");
            if (finishReason is null) w.WriteNull("finish_reason");
            else w.WriteString("finish_reason", finishReason);
            w.WriteEndObject();
            w.WriteEndArray();
            w.WriteEndObject();
        });

    // ---- streaming plumbing ----

    /// <summary>
    /// Runs the job while tokens travel through a channel from the generating thread to this request's writer, so the
    /// CPU-bound generation never waits on the network. Returns null when the stream ended with an error event.
    /// </summary>
    private async Task<InferenceOutcome?> StreamAsync(HttpContext context, InferenceEngine.Slot slot, InferenceJob job, Func<GeneratedToken, Task> write)
    {
        var channel = Channel.CreateUnbounded<GeneratedToken>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });
        var run = _engine.RunAsync(slot, job, token => channel.Writer.TryWrite(token), context.RequestAborted);
        _ = run.ContinueWith(_ => channel.Writer.TryComplete(), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        try
        {
            await foreach (var token in channel.Reader.ReadAllAsync(context.RequestAborted).ConfigureAwait(false))
                await write(token).ConfigureAwait(false);
            return await run.ConfigureAwait(false);
        }
        catch (Exception e) when (!context.RequestAborted.IsCancellationRequested && e is not OperationCanceledException)
        {
            await WriteEventAsync(context, "error", w =>
            {
                w.WriteStartObject();
                w.WriteString("error", e.Message);
                w.WriteEndObject();
            }).ConfigureAwait(false);
            Log(context, 500, null, null, e.Message);
            return null;
        }
        finally
        {
            // The slot is released by the caller; the generation must have stopped before that.
            try { await run.ConfigureAwait(false); } catch { /* reported above or the client left */ }
        }
    }

    private static string Remainder(string text, StringBuilder streamed) =>
        text.Length > streamed.Length && text.StartsWith(streamed.ToString(), StringComparison.Ordinal) ? text[streamed.Length..] : "";

    private static void StartEventStream(HttpContext context)
    {
        var response = context.Response;
        response.StatusCode = 200;
        response.ContentType = "text/event-stream; charset=utf-8";
        response.Headers.CacheControl = "no-cache";
        response.Headers["X-Accel-Buffering"] = "no";   // nginx-style proxies: do not buffer the stream
        context.Features.Get<IHttpResponseBodyFeature>()?.DisableBuffering();
    }

    private static async Task WriteEventAsync(HttpContext context, string? eventName, Action<Utf8JsonWriter> body)
    {
        var buffer = new ArrayBufferWriter<byte>(256);
        if (eventName is not null) buffer.Write(Encoding.UTF8.GetBytes($"event: {eventName}\n"));
        buffer.Write("data: "u8);
        using (var w = new Utf8JsonWriter(buffer, WriterOptions)) body(w);   // escapes newlines, so the data stays one line
        buffer.Write("\n\n"u8);
        await WriteRawEventAsync(context, buffer.WrittenMemory).ConfigureAwait(false);
    }

    private static async Task WriteRawEventAsync(HttpContext context, ReadOnlyMemory<byte> bytes)
    {
        await context.Response.Body.WriteAsync(bytes, context.RequestAborted).ConfigureAwait(false);
        await context.Response.Body.FlushAsync(context.RequestAborted).ConfigureAwait(false);
    }

    internal static async Task WriteJsonAsync(HttpContext context, int status, Action<Utf8JsonWriter> body)
    {
        var buffer = new ArrayBufferWriter<byte>(512);
        using (var w = new Utf8JsonWriter(buffer, WriterOptions)) body(w);
        var response = context.Response;
        response.StatusCode = status;
        response.ContentType = "application/json; charset=utf-8";
        response.ContentLength = buffer.WrittenCount;
        await response.Body.WriteAsync(buffer.WrittenMemory, context.RequestAborted).ConfigureAwait(false);
    }

    // ---- errors and logging ----

    /// <summary>
    /// Turns request errors into <c>{"error": "..."}</c> with their status: 400 bad input, 413 too large, 415 wrong
    /// content type, 503 busy or loading (with Retry-After), 500 anything unexpected.
    /// </summary>
    private RequestDelegate Guard(Func<HttpContext, Stopwatch, Task> handler) => async context =>
    {
        var clock = Stopwatch.StartNew();
        int status;
        string message;
        try
        {
            await handler(context, clock).ConfigureAwait(false);
            return;
        }
        catch (OperationCanceledException) when (context.RequestAborted.IsCancellationRequested)
        {
            Log(context, 499, clock, null, "client closed the connection");
            return;
        }
        catch (RequestException e)
        {
            (status, message) = (e.StatusCode, e.Message);
        }
        catch (BadHttpRequestException e)
        {
            status = e.StatusCode;
            message = e.StatusCode == 413 ? TooLarge(_options.MaxRequestBytes) : $"bad request: {e.Message}";
        }
        catch (Exception e)
        {
            (status, message) = (500, $"internal error: {e.Message}");
        }
        Log(context, status, clock, null, message);
        if (context.Response.HasStarted) return;
        if (status == 503) context.Response.Headers.RetryAfter = "1";
        if (status == 413) context.Response.Headers.Connection = "close";   // the rest of the body is not read
        await WriteJsonAsync(context, status, w =>
        {
            w.WriteStartObject();
            w.WriteString("error", message);
            w.WriteEndObject();
        }).ConfigureAwait(false);
    };

    internal static string TooLarge(long limit) =>
        $"request body too large: the limit is {limit} bytes (--max-request-bytes)";

    private void Log(HttpContext context, int status, Stopwatch? clock, InferenceOutcome? outcome, string? error = null)
    {
        if (_options.Quiet) return;
        var line = new StringBuilder($"[serve] {context.Request.Method} {context.Request.Path} {status}");
        if (clock is not null) line.Append(FormattableString.Invariant($" {clock.Elapsed.TotalMilliseconds:F0} ms"));
        if (outcome is not null)
            line.Append(FormattableString.Invariant($" (queue {outcome.QueueWait.TotalMilliseconds:F0} ms, {outcome.Result.GeneratedIds.Length} tokens)"));
        if (error is not null) line.Append(": ").Append(error);
        Console.Error.WriteLine(line.ToString());
    }
}
