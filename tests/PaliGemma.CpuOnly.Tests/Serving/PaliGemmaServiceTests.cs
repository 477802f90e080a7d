using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Serving;
using PaliGemma.CpuOnly.Tests.Golden;
using PaliGemma.CpuOnly.Tests.Tensors;

namespace PaliGemma.CpuOnly.Tests.Serving;

public sealed class PaliGemmaServiceTests
{
    private const string Case = "tiny-mqa-56";
    private static readonly TimeSpan Patience = TimeSpan.FromMilliseconds(300);

    private static PaliGemmaModel Model => GoldenData.Model(Case);

    private static RgbImage Image(string file = "rgb_640x480.png") => ImageLoader.Load(Path.Combine(TestPaths.Golden, Case, file));

    private static GenerationOptions Sampled(ulong seed, int maxNewTokens = 10) => new()
    {
        MaxNewTokens = maxNewTokens,
        Sampling = new SamplingOptions { Temperature = 1f, TopK = 50, Seed = seed },
    };

    private sealed class ProgressCallback(Action<InferenceProgress> onReport) : IProgress<InferenceProgress>
    {
        public void Report(InferenceProgress value) => onReport(value);
    }

    [Fact]
    public async Task Parallel_requests_equal_their_sequential_results()
    {
        string[] prompts = ["caption en", "describe en", "what is this?", "detect cat", "ocr", "answer en where", "caption es", "question"];
        string[] files = ["rgb_640x480.png", "gray_200x150.png", "rgba_300x200.png", "rgb_123x457.jpg"];
        var requests = prompts.Select((p, i) => (Request: new GenerationRequest(Image(files[i % files.Length]), p), Options: Sampled((ulong)(i * 7919 + 1)))).ToArray();

        var generator = new PaliGemmaGenerator(Model);
        var sequential = requests.Select(r => generator.Generate(r.Request, r.Options)).ToArray();

        await using var service = new PaliGemmaService(Model, new PaliGemmaServiceOptions { MaxConcurrentSessions = 4 });
        var parallel = await Task.WhenAll(requests.Select(r => Task.Run(() => service.GenerateAsync(r.Request, r.Options))));

        for (int i = 0; i < requests.Length; i++)
        {
            Assert.Equal(sequential[i].GeneratedIds, parallel[i].GeneratedIds);
            Assert.Equal(sequential[i].Text, parallel[i].Text);
            Assert.Equal(sequential[i].PromptIds, parallel[i].PromptIds);
        }
        // Different seeds and prompts must lead somewhere different, or the comparison above proves little.
        Assert.True(sequential.Select(r => string.Join(",", r.GeneratedIds)).Distinct().Count() > 1);
        Assert.Equal(0, service.ActiveSessions);
    }

    [Fact]
    public async Task Sessions_never_exceed_the_cap()
    {
        const int cap = 2;
        await using var service = new PaliGemmaService(Model, new PaliGemmaServiceOptions { MaxConcurrentSessions = cap });
        int inside = 0, mostInside = 0, mostReported = 0;
        var options = new GenerationOptions
        {
            MaxNewTokens = 4,
            // Reported from inside a running session (vision and prefill layers).
            Progress = new ProgressCallback(p =>
            {
                if (p.Stage == "vision" && p.Done == 1)
                {
                    int now = Interlocked.Increment(ref inside);
                    InterlockedMax(ref mostInside, now);
                    Thread.Sleep(20);   // widen the window in which an over-admitted request would be seen
                }
                if (p.Stage == "prefill" && p.Done == p.Total) Interlocked.Decrement(ref inside);
                InterlockedMax(ref mostReported, service.ActiveSessions);
            }),
        };
        var image = Image();
        await Task.WhenAll(Enumerable.Range(0, 8).Select(i => Task.Run(() => service.GenerateAsync(new GenerationRequest(image, $"caption {i}"), options))));

        Assert.InRange(mostInside, 1, cap);
        Assert.InRange(mostReported, 1, cap);
        Assert.Equal(0, service.ActiveSessions);
        Assert.Equal(0, service.WaitingRequests);
    }

    [Fact]
    public async Task A_request_beyond_the_cap_waits_until_a_session_is_given_back()
    {
        await using var service = new PaliGemmaService(Model, new PaliGemmaServiceOptions { MaxConcurrentSessions = 1 });
        var first = service.StreamAsync(new GenerationRequest(Image(), "caption en"), Sampled(1)).GetAsyncEnumerator();
        Assert.True(await first.MoveNextAsync());   // holds the only session until disposed
        Assert.Equal(1, service.ActiveSessions);

        var second = service.StreamAsync(new GenerationRequest(Image(), "caption en"), Sampled(2)).GetAsyncEnumerator();
        var waiting = second.MoveNextAsync().AsTask();
        await Task.Delay(Patience);
        Assert.False(waiting.IsCompleted);
        Assert.Equal(1, service.WaitingRequests);

        await first.DisposeAsync();
        Assert.True(await waiting.WaitAsync(TimeSpan.FromSeconds(30)));
        await second.DisposeAsync();
        Assert.Equal(0, service.ActiveSessions);
    }

    [Fact]
    public async Task A_waiting_request_can_be_cancelled_and_leaves_the_queue()
    {
        await using var service = new PaliGemmaService(Model, new PaliGemmaServiceOptions { MaxConcurrentSessions = 1 });
        var holder = service.StreamAsync(new GenerationRequest(Image(), "caption en"), Sampled(1)).GetAsyncEnumerator();
        Assert.True(await holder.MoveNextAsync());

        using var cts = new CancellationTokenSource();
        var waiting = service.GenerateAsync(new GenerationRequest(Image(), "caption en"), Sampled(2), cts.Token);
        await Task.Delay(Patience);
        Assert.Equal(1, service.WaitingRequests);
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => waiting);
        Assert.Equal(0, service.WaitingRequests);

        await holder.DisposeAsync();
        var after = await service.GenerateAsync(new GenerationRequest(Image(), "caption en"), Sampled(3, maxNewTokens: 2));
        Assert.NotEmpty(after.GeneratedIds);
        Assert.Equal(0, service.ActiveSessions);
    }

    [Fact]
    public async Task Cancellation_between_tokens_stops_the_stream_and_frees_the_session()
    {
        await using var service = new PaliGemmaService(Model, new PaliGemmaServiceOptions { MaxConcurrentSessions = 1 });
        var request = new GenerationRequest(Image(), "caption en");
        // Pick a seed whose run is long enough to be cut short.
        var options = Sampled(11, maxNewTokens: 20);
        var full = await service.GenerateAsync(request, options);
        Assert.True(full.GeneratedIds.Length >= 4, $"the run stopped after {full.GeneratedIds.Length} tokens");

        using var cts = new CancellationTokenSource();
        var received = new List<int>();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
        {
            await foreach (var token in service.StreamAsync(request, options, cts.Token))
            {
                received.Add(token.Id);
                if (received.Count == 2) cts.Cancel();
            }
        });
        Assert.Equal(full.GeneratedIds.Take(2), received);
        Assert.Equal(0, service.ActiveSessions);
    }

    [Theory]
    [InlineData("vision")]
    [InlineData("prefill")]
    public async Task Cancellation_inside_a_long_step_stops_at_the_next_layer(string stage)
    {
        await using var service = new PaliGemmaService(Model);
        using var cts = new CancellationTokenSource();
        var reports = new List<InferenceProgress>();
        var options = new GenerationOptions
        {
            MaxNewTokens = 4,
            Progress = new ProgressCallback(p =>
            {
                reports.Add(p);
                if (p.Stage == stage && p.Done == 1) cts.Cancel();
            }),
        };
        Assert.True((stage == "vision" ? Model.Config.Vision.NumHiddenLayers : Model.Config.Text.NumHiddenLayers) >= 2);

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => service.GenerateAsync(new GenerationRequest(Image(), "caption en"), options, cts.Token));
        Assert.Equal(new InferenceProgress(stage, 1, stage == "vision" ? Model.Config.Vision.NumHiddenLayers : Model.Config.Text.NumHiddenLayers), reports[^1]);
        Assert.Equal(0, service.ActiveSessions);
    }

    [Fact]
    public async Task Streamed_tokens_arrive_in_order_and_match_the_whole_result()
    {
        await using var service = new PaliGemmaService(Model);
        var request = new GenerationRequest(Image("rgb_123x457.jpg"), "describe en");
        for (ulong seed = 1; seed <= 3; seed++)
        {
            var options = Sampled(seed, maxNewTokens: 12);
            var whole = await service.GenerateAsync(request, options);
            var tokens = new List<GeneratedToken>();
            await foreach (var token in service.StreamAsync(request, options)) tokens.Add(token);

            Assert.Equal(Enumerable.Range(0, tokens.Count), tokens.Select(t => t.Step));
            Assert.Equal(whole.GeneratedIds, tokens.Select(t => t.Id));
            Assert.Equal(whole.Text, string.Concat(tokens.Select(t => t.Text)));
            Assert.Equal(whole.StoppedAtEos, tokens[^1].IsEnd);
            Assert.All(tokens.SkipLast(1), t => Assert.False(t.IsEnd));
        }
    }

    [Fact]
    public async Task A_request_whose_cache_can_never_fit_fails_with_a_clear_error()
    {
        var request = new GenerationRequest(Image(), "caption en");
        var options = new GenerationOptions { MaxNewTokens = 8 };
        int needed = Model.Tokenizer.BuildPrompt("caption en", Model.NumImageTokens).Length + 8;
        await using var probe = new PaliGemmaService(Model);
        long bytes = probe.KvCacheBytes(needed);

        await using var service = new PaliGemmaService(Model, new PaliGemmaServiceOptions { MaxKvCacheBytes = bytes - 1 });
        var error = await Assert.ThrowsAsync<ArgumentException>(() => service.GenerateAsync(request, options));
        Assert.Contains(nameof(PaliGemmaServiceOptions.MaxKvCacheBytes), error.Message);
        Assert.Contains($"{bytes - 1:N0}", error.Message);
        Assert.Equal(0, service.ActiveSessions);

        // Exactly enough: the capacity falls back from the rounded size to the exact one and the request runs.
        await using var exact = new PaliGemmaService(Model, new PaliGemmaServiceOptions { MaxKvCacheBytes = bytes });
        Assert.Equal(needed, exact.KvCacheCapacityFor(request, options));
        Assert.NotEmpty((await exact.GenerateAsync(request, options)).GeneratedIds);
    }

    [Fact]
    public async Task The_memory_cap_makes_a_second_request_wait_and_caches_are_reused()
    {
        var request = new GenerationRequest(Image(), "caption en");
        var options = Sampled(5, maxNewTokens: 6);
        await using var probe = new PaliGemmaService(Model);
        long oneCache = probe.KvCacheBytes(probe.KvCacheCapacityFor(request, options));

        await using var service = new PaliGemmaService(Model, new PaliGemmaServiceOptions { MaxConcurrentSessions = 4, MaxKvCacheBytes = oneCache + oneCache / 2 });
        var first = service.StreamAsync(request, options).GetAsyncEnumerator();
        Assert.True(await first.MoveNextAsync());
        Assert.Equal(oneCache, service.KvCacheBytesInUse);

        var second = service.GenerateAsync(request, options);
        await Task.Delay(Patience);
        Assert.False(second.IsCompleted);
        Assert.Equal(1, service.WaitingRequests);

        await first.DisposeAsync();
        var result = await second.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.NotEmpty(result.GeneratedIds);
        // The first request's cache was handed to the second, then kept: one cache's worth, idle.
        Assert.Equal(0, service.KvCacheBytesInUse);
        Assert.Equal(oneCache, service.KvCacheBytesIdle);
        var again = await service.GenerateAsync(request, options);
        Assert.Equal(result.GeneratedIds, again.GeneratedIds);
        Assert.Equal(oneCache, service.KvCacheBytesIdle);
    }

    [Fact]
    public async Task Disposing_fails_waiting_requests_and_refuses_new_ones()
    {
        var service = new PaliGemmaService(Model, new PaliGemmaServiceOptions { MaxConcurrentSessions = 1 });
        var holder = service.StreamAsync(new GenerationRequest(Image(), "caption en"), Sampled(1)).GetAsyncEnumerator();
        Assert.True(await holder.MoveNextAsync());
        var waiting = service.GenerateAsync(new GenerationRequest(Image(), "caption en"), Sampled(2));
        await Task.Delay(Patience);

        var disposing = service.DisposeAsync().AsTask();
        await Assert.ThrowsAsync<ObjectDisposedException>(() => waiting);
        Assert.False(disposing.IsCompleted, disposing.Exception?.ToString());   // the running stream still holds its session
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await holder.MoveNextAsync());
        await holder.DisposeAsync();
        await disposing.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Throws<ObjectDisposedException>(() => service.StreamAsync(new GenerationRequest(Image(), "caption en")));
    }

    private static void InterlockedMax(ref int target, int value)
    {
        int current;
        while (value > (current = Volatile.Read(ref target)) && Interlocked.CompareExchange(ref target, value, current) != current)
        {
        }
    }
}

public sealed class PaliGemmaServiceTaskTests
{
    [Theory]
    [InlineData("detect cat ; dog")]
    [InlineData("caption en")]
    public async Task RunTaskAsync_matches_PaliGemmaTasks(string prompt)
    {
        var model = GoldenData.Model("tiny-mqa-56");
        var image = ImageLoader.Load(Path.Combine(TestPaths.Golden, "tiny-mqa-56", "rgb_640x480.png"));
        var options = new GenerationOptions { MaxNewTokens = 12, Sampling = new SamplingOptions { Temperature = 1f, Seed = 9 } };
        var expected = new PaliGemma.CpuOnly.Model.Tasks.PaliGemmaTasks(model).Run(image, prompt, options);

        await using var service = new PaliGemmaService(model);
        var actual = await service.RunTaskAsync(image, prompt, options);

        Assert.Equal(expected.Task, actual.Task);
        Assert.Equal(expected.GeneratedIds, actual.GeneratedIds);
        Assert.Equal(expected.Text, actual.Text);
        Assert.Equal(expected.Objects.Select(o => $"{o.Label}:{string.Join(",", o.LocY1X1Y2X2)}"), actual.Objects.Select(o => $"{o.Label}:{string.Join(",", o.LocY1X1Y2X2)}"));
    }
}
