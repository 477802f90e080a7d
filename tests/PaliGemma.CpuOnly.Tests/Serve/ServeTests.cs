using System.Net;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using PaliGemma.Cli.Serve;
using PaliGemma.CpuOnly.Tests.Cli;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.Serve;

/// <summary>A <c>paligemma serve</c> host on a free loopback port with the tiny golden model, called over real HTTP.</summary>
public sealed class ServerFixture : IAsyncLifetime
{
    public GoldenSample Caption { get; } = GoldenData.Sample("tiny-mqa-56", "s1_caption");
    public PaliGemmaServer Server { get; private set; } = null!;
    public HttpClient Client { get; private set; } = null!;

    public async Task InitializeAsync() => (Server, Client) = await StartAsync(o => o with { MaxConcurrency = 2 });

    public async Task DisposeAsync()
    {
        Client.Dispose();
        await Server.DisposeAsync();
    }

    public static async Task<(PaliGemmaServer Server, HttpClient Client)> StartAsync(Func<ServeOptions, ServeOptions>? configure = null)
    {
        var options = new ServeOptions
        {
            ModelDirectory = Path.Combine(TestPaths.Golden, "tiny-mqa-56"),
            Urls = ["http://127.0.0.1:0"],
            Quiet = true,
        };
        var server = PaliGemmaServer.Create(configure?.Invoke(options) ?? options);
        await server.StartAsync();
        await server.ModelReady;
        var client = new HttpClient { BaseAddress = new Uri(server.Urls.First()), Timeout = TimeSpan.FromSeconds(60) };
        return (server, client);
    }
}

/// <summary>In the console collection because one test compares with the CLI run in-process (console captured).</summary>
[Collection(nameof(ConsoleCollection))]
public sealed class ServeTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private readonly HttpClient _client = fixture.Client;
    private readonly GoldenSample _caption = fixture.Caption;

    private string ImagePath(string name = "") => Path.Combine(_caption.CaseDirectory, name.Length == 0 ? _caption.Images[0] : name);

    internal static MultipartFormDataContent Form(string? imagePath, params (string Name, string Value)[] fields)
    {
        var form = new MultipartFormDataContent();
        if (imagePath is not null)
        {
            var file = new ByteArrayContent(File.ReadAllBytes(imagePath));
            file.Headers.ContentType = new MediaTypeHeaderValue("application/octet-stream");
            form.Add(file, "image", Path.GetFileName(imagePath));
        }
        foreach (var (name, value) in fields) form.Add(new StringContent(value), name);
        return form;
    }

    private (string Name, string Value)[] GoldenFields(params (string, string)[] extra) =>
        [("prompt", _caption.Prompts[0]), ("max_new_tokens", _caption.MaxNewTokens.ToString()), .. extra];

    private static async Task<JsonElement> JsonOf(HttpResponseMessage response, HttpStatusCode expected)
    {
        string body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == expected, $"{(int)response.StatusCode}: {body}");
        Assert.StartsWith("application/json", response.Content.Headers.ContentType?.MediaType);
        return JsonDocument.Parse(body).RootElement.Clone();
    }

    private static int[] Ints(JsonElement array) => array.EnumerateArray().Select(e => e.GetInt32()).ToArray();

    /// <summary>Parses a server-sent event stream into (event name or null, data) pairs.</summary>
    internal static List<(string? Event, string Data)> Events(string stream)
    {
        var events = new List<(string?, string)>();
        foreach (var block in stream.Split("\n\n", StringSplitOptions.RemoveEmptyEntries))
        {
            string? name = null, data = null;
            foreach (var line in block.Split('\n'))
            {
                if (line.StartsWith("event: ", StringComparison.Ordinal)) name = line[7..];
                else if (line.StartsWith("data: ", StringComparison.Ordinal)) data = line[6..];
            }
            Assert.NotNull(data);
            events.Add((name, data!));
        }
        return events;
    }

    [Fact]
    public async Task Healthz_reports_the_loaded_model()
    {
        var health = await JsonOf(await _client.GetAsync("/healthz"), HttpStatusCode.OK);
        Assert.Equal("ok", health.GetProperty("status").GetString());
        Assert.Equal("tiny-mqa-56", health.GetProperty("model").GetString());
        Assert.Equal(56, health.GetProperty("config").GetProperty("image_size").GetInt32());
        Assert.Equal(16, health.GetProperty("config").GetProperty("num_image_tokens").GetInt32());
        Assert.Equal(2, health.GetProperty("max_concurrency").GetInt32());
        var models = await JsonOf(await _client.GetAsync("/v1/models"), HttpStatusCode.OK);
        Assert.Equal("tiny-mqa-56", models.GetProperty("data")[0].GetProperty("id").GetString());
    }

    [Fact]
    public async Task Generate_returns_the_golden_ids_text_and_timings()
    {
        var result = await JsonOf(await _client.PostAsync("/v1/generate", Form(ImagePath(), GoldenFields())), HttpStatusCode.OK);
        Assert.Equal(Ints(_caption.Json.GetProperty("generated_ids_list")[0]), Ints(result.GetProperty("generated_ids")));
        Assert.Equal(Ints(_caption.Json.GetProperty("input_ids_list")[0]), Ints(result.GetProperty("prompt_ids")));
        Assert.Equal(_caption.Json.GetProperty("generated_text")[0].GetString(), result.GetProperty("text").GetString());
        Assert.Equal("caption", result.GetProperty("task").GetString());
        Assert.Equal(640, result.GetProperty("image_size").GetProperty("width").GetInt32());
        Assert.False(result.GetProperty("stopped_at_eos").GetBoolean());
        Assert.Equal(_caption.MaxNewTokens - 1, result.GetProperty("timings_ms").GetProperty("decode_steps").GetInt32());
        Assert.True(result.GetProperty("timings_ms").GetProperty("vision").GetDouble() > 0);
    }

    [Fact]
    public async Task Task_fields_build_the_prompt_and_detect_objects_match_the_cli_json()
    {
        var result = await JsonOf(await _client.PostAsync("/v1/generate",
            Form(ImagePath(), ("task", "detect"), ("objects", "bird"), ("max_new_tokens", "64"))), HttpStatusCode.OK);
        Assert.Equal("detect", result.GetProperty("task").GetString());
        Assert.Equal("detect bird", result.GetProperty("prompt").GetString());
        var objects = result.GetProperty("objects");
        Assert.Equal(JsonValueKind.Array, objects.ValueKind);
        var expected = CpuOnly.Model.Tasks.OutputParser.Parse(result.GetProperty("text").GetString()!, 640, 480);
        // The random tiny model happens to emit four locs and a label for this prompt and image (greedy, so stable).
        Assert.NotEmpty(expected);
        Assert.Equal(expected.Count, objects.GetArrayLength());
        for (int i = 0; i < expected.Count; i++)
        {
            var o = objects[i];
            Assert.Equal(expected[i].Label, o.GetProperty("label").GetString());
            Assert.Equal(expected[i].BoxXyxy, o.GetProperty("box_xyxy").EnumerateArray().Select(e => e.GetDouble()));
            Assert.Equal(expected[i].LocY1X1Y2X2, Ints(o.GetProperty("loc_y1x1y2x2")));
            Assert.Equal(JsonValueKind.Null, o.GetProperty("mask").ValueKind);
        }

        var (code, stdout, stderr) = CliTests.Run("detect", "--model", _caption.CaseDirectory, "--image", ImagePath(),
            "--object", "bird", "--max-new-tokens", "64", "--json", "--quiet");
        Assert.True(code == 0, stderr);
        using var cli = JsonDocument.Parse(stdout);
        Assert.Equal(cli.RootElement.GetProperty("text").GetString(), result.GetProperty("text").GetString());
        Assert.Equal(cli.RootElement.GetProperty("objects").GetRawText(), objects.GetRawText());
    }

    [Fact]
    public async Task Answer_task_uses_question_and_lang()
    {
        var result = await JsonOf(await _client.PostAsync("/v1/generate",
            Form(ImagePath(), ("task", "answer"), ("question", "what is this?"), ("lang", "de"), ("max_new_tokens", "3"))), HttpStatusCode.OK);
        Assert.Equal("answer de what is this?", result.GetProperty("prompt").GetString());
        Assert.False(result.TryGetProperty("objects", out _));
        Assert.Equal(3, result.GetProperty("generated_ids").GetArrayLength());
    }

    [Theory]
    [InlineData("stream", "true")]
    [InlineData("accept", "text/event-stream")]
    public async Task Streamed_tokens_concatenate_to_the_non_streamed_text(string how, string value)
    {
        // The golden caption: its ids include byte tokens that only make text together (a U+FFFD), the streaming edge case.
        var fields = GoldenFields();
        var plain = await JsonOf(await _client.PostAsync("/v1/generate", Form(ImagePath(), fields)), HttpStatusCode.OK);

        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/generate")
        {
            Content = Form(ImagePath(), how == "stream" ? [.. fields, ("stream", value)] : fields),
        };
        if (how == "accept") request.Headers.Accept.ParseAdd(value);
        using var response = await _client.SendAsync(request);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType?.MediaType);
        var events = Events(await response.Content.ReadAsStringAsync());

        var tokens = events.Where(e => e.Event == "token").Select(e => JsonDocument.Parse(e.Data).RootElement).ToList();
        Assert.Equal("result", events[^1].Event);
        Assert.Equal(events.Count - 1, tokens.Count);
        var final = JsonDocument.Parse(events[^1].Data).RootElement;
        string text = plain.GetProperty("text").GetString()!;
        Assert.Equal(text, string.Concat(tokens.Select(t => t.GetProperty("text").GetString())));
        Assert.Equal(text, final.GetProperty("text").GetString());
        Assert.Equal(_caption.Json.GetProperty("generated_text")[0].GetString(), text);
        int[] ids = Ints(plain.GetProperty("generated_ids"));
        Assert.Equal(ids, Ints(final.GetProperty("generated_ids")));
        Assert.Equal(ids, tokens.Where(t => t.GetProperty("id").ValueKind == JsonValueKind.Number).Select(t => t.GetProperty("id").GetInt32()));
    }

    private string ChatBody(string prompt, bool stream, string? imageUrl = null, string extra = "")
    {
        imageUrl ??= "data:image/png;base64," + Convert.ToBase64String(File.ReadAllBytes(ImagePath()));
        return $$$"""
            {"model": "paligemma", "stream": {{{(stream ? "true" : "false")}}}, "max_tokens": {{{_caption.MaxNewTokens}}}{{{extra}}},
             "messages": [{"role": "system", "content": "ignored"},
                          {"role": "user", "content": [{"type": "text", "text": "{{{prompt}}}"}, {"type": "image_url", "image_url": {"url": "{{{imageUrl}}}"}}]}]}
            """;
    }

    private static StringContent Json(string body) => new(body, Encoding.UTF8, "application/json");

    [Fact]
    public async Task Chat_completions_with_a_data_url_returns_the_openai_shape()
    {
        var result = await JsonOf(await _client.PostAsync("/v1/chat/completions", Json(ChatBody(_caption.Prompts[0], false))), HttpStatusCode.OK);
        Assert.Equal("chat.completion", result.GetProperty("object").GetString());
        Assert.StartsWith("chatcmpl-", result.GetProperty("id").GetString());
        var choice = result.GetProperty("choices")[0];
        Assert.Equal("assistant", choice.GetProperty("message").GetProperty("role").GetString());
        Assert.Equal(_caption.Json.GetProperty("generated_text")[0].GetString(), choice.GetProperty("message").GetProperty("content").GetString());
        Assert.Equal("length", choice.GetProperty("finish_reason").GetString());
        var usage = result.GetProperty("usage");
        Assert.Equal(_caption.Json.GetProperty("input_ids_list")[0].GetArrayLength(), usage.GetProperty("prompt_tokens").GetInt32());
        Assert.Equal(_caption.MaxNewTokens, usage.GetProperty("completion_tokens").GetInt32());
        Assert.Equal(usage.GetProperty("prompt_tokens").GetInt32() + _caption.MaxNewTokens, usage.GetProperty("total_tokens").GetInt32());
    }

    [Fact]
    public async Task Chat_completions_stream_sends_openai_chunks_and_done()
    {
        using var response = await _client.PostAsync("/v1/chat/completions",
            Json(ChatBody(_caption.Prompts[0], true, extra: """, "stream_options": {"include_usage": true}""")));
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType?.MediaType);
        var events = Events(await response.Content.ReadAsStringAsync());
        Assert.Equal("[DONE]", events[^1].Data);
        Assert.All(events, e => Assert.Null(e.Event));
        var chunks = events.SkipLast(1).Select(e => JsonDocument.Parse(e.Data).RootElement).ToList();
        Assert.All(chunks, c => Assert.Equal("chat.completion.chunk", c.GetProperty("object").GetString()));
        Assert.Single(chunks.Select(c => c.GetProperty("id").GetString()).Distinct());
        Assert.Equal("assistant", chunks[0].GetProperty("choices")[0].GetProperty("delta").GetProperty("role").GetString());
        var withChoices = chunks.Where(c => c.GetProperty("choices").GetArrayLength() > 0).ToList();
        string content = string.Concat(withChoices.Select(c => c.GetProperty("choices")[0].GetProperty("delta"))
            .Select(d => d.TryGetProperty("content", out var t) ? t.GetString() : ""));
        Assert.Equal(_caption.Json.GetProperty("generated_text")[0].GetString(), content);
        Assert.Equal("length", withChoices[^1].GetProperty("choices")[0].GetProperty("finish_reason").GetString());
        Assert.Equal(_caption.MaxNewTokens, chunks[^1].GetProperty("usage").GetProperty("completion_tokens").GetInt32());
    }

    public static TheoryData<string, int, string> BadGenerateRequests() => new()
    {
        { "no-image", 400, "no image" },
        { "not-an-image", 400, "bad image" },
        { "bad-max-new-tokens", 400, "max_new_tokens must be an integer" },
        { "zero-max-new-tokens", 400, "max_new_tokens must be an integer" },
        { "bad-temperature", 400, "temperature must be a number" },
        { "bad-top-p", 400, "top_p must be a number above 0 and at most 1" },
        { "bad-seed", 400, "seed must be a non-negative integer" },
        { "unknown-task", 400, "unknown task 'count'" },
        { "answer-without-question", 400, "needs a 'question' field" },
        { "prompt-and-task", 400, "either 'prompt' or 'task'" },
        { "no-prompt", 400, "no prompt" },
        { "unknown-field", 400, "unknown field 'promt'" },
        { "prompt-too-long", 400, "prompt too long" },
        { "not-multipart", 415, "multipart/form-data" },
    };

    [Theory]
    [MemberData(nameof(BadGenerateRequests))]
    public async Task Bad_generate_requests_get_a_4xx_json_error(string kind, int status, string message)
    {
        string image = ImagePath();
        HttpContent content = kind switch
        {
            "no-image" => Form(null, ("prompt", "caption en")),
            "not-an-image" => Form(Path.Combine(_caption.CaseDirectory, "config.json"), ("prompt", "caption en")),
            "bad-max-new-tokens" => Form(image, ("prompt", "caption en"), ("max_new_tokens", "lots")),
            "zero-max-new-tokens" => Form(image, ("prompt", "caption en"), ("max_new_tokens", "0")),
            "bad-temperature" => Form(image, ("prompt", "caption en"), ("temperature", "-1")),
            "bad-top-p" => Form(image, ("prompt", "caption en"), ("top_p", "1.5")),
            "bad-seed" => Form(image, ("prompt", "caption en"), ("seed", "-3")),
            "unknown-task" => Form(image, ("task", "count")),
            "answer-without-question" => Form(image, ("task", "answer")),
            "prompt-and-task" => Form(image, ("prompt", "caption en"), ("task", "caption")),
            "no-prompt" => Form(image),
            "unknown-field" => Form(image, ("promt", "caption en")),
            "prompt-too-long" => Form(image, ("prompt", string.Concat(Enumerable.Repeat("x ", 9000)))),
            "not-multipart" => Json("""{"prompt": "caption en"}"""),
            _ => throw new ArgumentException(kind),
        };
        using var response = await _client.PostAsync("/v1/generate", content);
        var error = await JsonOf(response, (HttpStatusCode)status);
        Assert.Contains(message, error.GetProperty("error").GetString());
    }

    public static TheoryData<string, int, string> BadChatRequests() => new()
    {
        { "not-json", 400, "not valid JSON" },
        { "no-messages", 400, "'messages' must be a non-empty array" },
        { "no-image", 400, "no image" },
        { "http-url", 400, "must be a data: URL" },
        { "bad-base64", 400, "invalid base64" },
        { "not-an-image", 400, "bad image" },
        { "two-images", 400, "one image per request" },
        { "bad-max-tokens", 400, "max_tokens must be an integer" },
        { "bad-part", 400, "unsupported content part type 'audio'" },
        { "form-body", 415, "application/json" },
    };

    [Theory]
    [MemberData(nameof(BadChatRequests))]
    public async Task Bad_chat_requests_get_a_4xx_json_error(string kind, int status, string message)
    {
        string png = "data:image/png;base64," + Convert.ToBase64String(File.ReadAllBytes(ImagePath()));
        const string text = """{"type": "text", "text": "caption en"}""";
        string Body(string parts, string extra = "") => $$"""{"messages": [{"role": "user", "content": [{{parts}}]}]{{extra}}}""";
        string Image(string url) => $$$"""{"type": "image_url", "image_url": {"url": "{{{url}}}"}}""";
        HttpContent content = kind switch
        {
            "not-json" => Json("{\"messages\": ["),
            "no-messages" => Json("""{"messages": []}"""),
            "no-image" => Json(Body(text)),
            "http-url" => Json(Body(text + "," + Image("http://example.com/cat.png"))),
            "bad-base64" => Json(Body(text + "," + Image("data:image/png;base64,@@@"))),
            "not-an-image" => Json(Body(text + "," + Image("data:image/png;base64," + Convert.ToBase64String("hello"u8.ToArray())))),
            "two-images" => Json(Body(text + "," + Image(png) + "," + Image(png))),
            "bad-max-tokens" => Json(Body(text + "," + Image(png), """, "max_tokens": "many" """)),
            "bad-part" => Json(Body(text + """, {"type": "audio"}""")),
            "form-body" => Form(ImagePath(), ("prompt", "caption en")),
            _ => throw new ArgumentException(kind),
        };
        using var response = await _client.PostAsync("/v1/chat/completions", content);
        var error = await JsonOf(response, (HttpStatusCode)status);
        Assert.Contains(message, error.GetProperty("error").GetString());
    }

    [Fact]
    public async Task Concurrent_requests_get_their_own_results()
    {
        string[] images = ["rgb_640x480.png", "gray_200x150.png", "rgba_300x200.png", "rgb_123x457.jpg"];
        var sequential = new List<int[]>();
        foreach (var name in images)
        {
            var r = await JsonOf(await _client.PostAsync("/v1/generate", Form(ImagePath(name), ("prompt", "caption en"), ("max_new_tokens", "24"))), HttpStatusCode.OK);
            sequential.Add(Ints(r.GetProperty("generated_ids")));
        }
        var concurrent = await Task.WhenAll(Enumerable.Range(0, 12).Select(async i =>
        {
            var r = await JsonOf(await _client.PostAsync("/v1/generate", Form(ImagePath(images[i % 4]), ("prompt", "caption en"), ("max_new_tokens", "24"))), HttpStatusCode.OK);
            return (i % 4, Ints(r.GetProperty("generated_ids")));
        }));
        foreach (var (index, ids) in concurrent) Assert.Equal(sequential[index], ids);
        Assert.NotEqual(sequential[0], sequential[1]);
    }
}

/// <summary>Servers of their own: limits, saturation and shutdown need settings or timing the shared one must not have.</summary>
public sealed class ServeLifecycleTests
{
    private static readonly GoldenSample Caption = GoldenData.Sample("tiny-mqa-56", "s1_caption");
    private static string ImagePath => Path.Combine(Caption.CaseDirectory, Caption.Images[0]);

    private static MultipartFormDataContent GoldenForm() =>
        ServeTests.Form(ImagePath, ("prompt", Caption.Prompts[0]), ("max_new_tokens", Caption.MaxNewTokens.ToString()));

    /// <summary>Holds every request at the generation step until released, and says when one got there.</summary>
    private sealed class Gate
    {
        public readonly SemaphoreSlim Arrived = new(0);
        public readonly TaskCompletionSource Release = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public async Task Hold(CancellationToken cancellationToken)
        {
            Arrived.Release();
            await Release.Task.WaitAsync(cancellationToken);
        }
    }

    [Fact]
    public async Task A_body_over_the_limit_gets_413()
    {
        var (server, client) = await ServerFixture.StartAsync(o => o with { MaxRequestBytes = 4096 });
        await using var _ = server;
        using var __ = client;
        var image = File.ReadAllBytes(ImagePath);
        Assert.True(image.Length > 8192, "the test image must exceed the limit");
        var response = await client.PostAsync("/v1/generate", GoldenForm());
        Assert.Equal(HttpStatusCode.RequestEntityTooLarge, response.StatusCode);
        using var body = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
        Assert.Contains("too large", body.RootElement.GetProperty("error").GetString());

        // Without a Content-Length the limit is met while reading (chunked upload).
        var chunked = new StreamContent(new MemoryStream(Encoding.UTF8.GetBytes("{\"messages\": [" + new string(' ', 10000) + "]}")));
        chunked.Headers.ContentType = new MediaTypeHeaderValue("application/json");
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions") { Content = chunked };
        request.Headers.TransferEncodingChunked = true;
        var chunkedResponse = await client.SendAsync(request);
        Assert.Equal(HttpStatusCode.RequestEntityTooLarge, chunkedResponse.StatusCode);
        Assert.Contains("too large", await chunkedResponse.Content.ReadAsStringAsync());
    }

    [Fact]
    public async Task A_full_queue_gets_503_with_retry_after()
    {
        var gate = new Gate();
        var (server, client) = await ServerFixture.StartAsync(o => o with { MaxConcurrency = 1, MaxQueue = 0, BeforeGenerate = gate.Hold });
        await using var _ = server;
        using var __ = client;
        var first = client.PostAsync("/v1/generate", GoldenForm());
        Assert.True(await gate.Arrived.WaitAsync(TimeSpan.FromSeconds(30)));

        var busy = await client.PostAsync("/v1/generate", GoldenForm());
        Assert.Equal(HttpStatusCode.ServiceUnavailable, busy.StatusCode);
        Assert.NotNull(busy.Headers.RetryAfter);
        Assert.Contains("busy", await busy.Content.ReadAsStringAsync());
        var health = JsonDocument.Parse(await client.GetStringAsync("/healthz")).RootElement;
        Assert.Equal(1, health.GetProperty("running").GetInt32());

        gate.Release.SetResult();
        Assert.Equal(HttpStatusCode.OK, (await first).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await client.PostAsync("/v1/generate", GoldenForm())).StatusCode);
    }

    [Fact]
    public async Task A_model_that_fails_to_load_gets_503_from_healthz_and_generate()
    {
        string empty = Directory.CreateTempSubdirectory("pg-serve-").FullName;
        try
        {
            var server = PaliGemmaServer.Create(new ServeOptions { ModelDirectory = empty, Urls = ["http://127.0.0.1:0"], Quiet = true });
            await using var _ = server;
            await server.StartAsync();
            await Assert.ThrowsAnyAsync<Exception>(() => server.ModelReady);
            using var client = new HttpClient { BaseAddress = new Uri(server.Urls.First()) };
            var health = await client.GetAsync("/healthz");
            Assert.Equal(HttpStatusCode.ServiceUnavailable, health.StatusCode);
            using var body = JsonDocument.Parse(await health.Content.ReadAsStringAsync());
            Assert.Equal("failed", body.RootElement.GetProperty("status").GetString());
            var generate = await client.PostAsync("/v1/generate", GoldenForm());
            Assert.Equal(HttpStatusCode.ServiceUnavailable, generate.StatusCode);
            Assert.Contains("failed to load", await generate.Content.ReadAsStringAsync());
        }
        finally
        {
            Directory.Delete(empty, true);
        }
    }

    [Fact]
    public async Task Stopping_finishes_the_request_in_flight()
    {
        var gate = new Gate();
        var (server, client) = await ServerFixture.StartAsync(o => o with { BeforeGenerate = gate.Hold, ShutdownTimeout = TimeSpan.FromSeconds(30) });
        await using var _ = server;
        using var __ = client;
        var inFlight = client.PostAsync("/v1/generate", GoldenForm());
        Assert.True(await gate.Arrived.WaitAsync(TimeSpan.FromSeconds(30)));

        var stopping = server.StopAsync();
        await Task.Delay(200);
        Assert.False(stopping.IsCompleted, "stop must wait for the request in flight");
        gate.Release.SetResult();

        var response = await inFlight;
        string body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.OK, body);
        using var result = JsonDocument.Parse(body);
        Assert.Equal(Caption.Json.GetProperty("generated_ids_list")[0].EnumerateArray().Select(e => e.GetInt32()),
            result.RootElement.GetProperty("generated_ids").EnumerateArray().Select(e => e.GetInt32()));
        await stopping.WaitAsync(TimeSpan.FromSeconds(30));
    }
}
