namespace PaliGemma.Cli.Serve;

/// <summary>Settings of <c>paligemma serve</c>.</summary>
public sealed record ServeOptions
{
    public required string ModelDirectory { get; init; }
    /// <summary>Addresses to listen on, e.g. <c>http://127.0.0.1:8080</c>; port 0 picks a free port.</summary>
    public IReadOnlyList<string> Urls { get; init; } = ["http://127.0.0.1:8080"];
    public string? TokenizerPath { get; init; }
    /// <summary>VQ-VAE mask decoder (vae-oid.npz): segment results get full-image masks; without it only seg codes.</summary>
    public string? VaePath { get; init; }
    /// <summary>Generations that run at once; each one uses every core through the kernels, so 1 or 2 is usual.</summary>
    public int MaxConcurrency { get; init; } = 1;
    /// <summary>Requests that may wait for a slot; more are refused with 503 and Retry-After.</summary>
    public int MaxQueue { get; init; } = 16;
    /// <summary>Largest request body in bytes (the multipart form, or the chat JSON with its base64 image).</summary>
    public long MaxRequestBytes { get; init; } = 20L << 20;
    /// <summary>Images with more pixels are refused before decoding.</summary>
    public long MaxImagePixels { get; init; } = 50_000_000;
    /// <summary>Largest accepted max_new_tokens / max_tokens.</summary>
    public int MaxNewTokensLimit { get; init; } = 1024;
    /// <summary>How long a stop (SIGTERM, Ctrl-C) waits for in-flight requests before they are aborted.</summary>
    public TimeSpan ShutdownTimeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>Log each request on stderr.</summary>
    public bool Quiet { get; init; }
    /// <summary>Test hook: awaited after a request got its slot, before it generates (holds a request in flight).</summary>
    public Func<CancellationToken, Task>? BeforeGenerate { get; init; }

    public void Validate()
    {
        if (MaxConcurrency < 1) throw new ArgumentOutOfRangeException(nameof(MaxConcurrency), MaxConcurrency, "must be at least 1");
        if (MaxQueue < 0) throw new ArgumentOutOfRangeException(nameof(MaxQueue), MaxQueue, "must not be negative");
        if (MaxRequestBytes < 1024) throw new ArgumentOutOfRangeException(nameof(MaxRequestBytes), MaxRequestBytes, "must be at least 1024");
        if (Urls.Count == 0) throw new ArgumentException("no URL to listen on", nameof(Urls));
    }
}
