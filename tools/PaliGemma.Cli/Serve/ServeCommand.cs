using Microsoft.Extensions.Hosting;

namespace PaliGemma.Cli.Serve;

/// <summary>
/// <c>paligemma serve</c>: loads one model and answers HTTP requests until SIGTERM or Ctrl-C, then finishes the
/// requests in flight (up to --shutdown-timeout) before it exits.
/// </summary>
public static class ServeCommand
{
    private static readonly HashSet<string> Flags = ["quiet"];

    public static int Run(string[] args)
    {
        var a = new ParsedArguments(args, Flags);
        var defaults = new ServeOptions { ModelDirectory = "" };
        string modelDir = a.Required("model");
        var options = new ServeOptions
        {
            ModelDirectory = modelDir,
            Urls = ParseUrls(a.Optional("urls")),
            TokenizerPath = a.Optional("tokenizer"),
            VaePath = a.Optional("vae"),
            MaxConcurrency = a.Int("max-concurrency", defaults.MaxConcurrency, 1, 1024),
            MaxQueue = a.Int("max-queue", defaults.MaxQueue, 0, 1 << 20),
            MaxRequestBytes = a.Int("max-request-bytes", (int)defaults.MaxRequestBytes, 1024, int.MaxValue),
            MaxNewTokensLimit = a.Int("max-new-tokens-limit", defaults.MaxNewTokensLimit, 1, 1 << 20),
            ShutdownTimeout = TimeSpan.FromSeconds(a.Int("shutdown-timeout", (int)defaults.ShutdownTimeout.TotalSeconds, 0, 3600)),
            Quiet = a.Flag("quiet"),
        };
        a.RejectUnknown();
        if (!Directory.Exists(modelDir)) throw new UsageException($"model folder '{modelDir}' not found");
        if (options.VaePath is { } vae && !File.Exists(vae)) throw new UsageException($"mask decoder '{vae}' not found");

        return RunAsync(options).GetAwaiter().GetResult();
    }

    private static async Task<int> RunAsync(ServeOptions options)
    {
        await using var server = PaliGemmaServer.Create(options);
        await server.StartAsync().ConfigureAwait(false);
        if (!options.Quiet) Console.Error.WriteLine($"[serve] listening on {string.Join(", ", server.Urls)}; loading {options.ModelDirectory}");
        try
        {
            await server.ModelReady.ConfigureAwait(false);
        }
        catch (Exception e)
        {
            Console.Error.WriteLine($"paligemma: the model failed to load: {e.Message}");
            await server.StopAsync().ConfigureAwait(false);
            return 1;
        }
        if (!options.Quiet) Console.Error.WriteLine($"[serve] model ready; max concurrency {options.MaxConcurrency}, queue {options.MaxQueue}");
        // Returns after SIGTERM / Ctrl-C once in-flight requests are done (or the shutdown timeout passed).
        await server.App.WaitForShutdownAsync().ConfigureAwait(false);
        if (!options.Quiet) Console.Error.WriteLine("[serve] stopped");
        return 0;
    }

    /// <summary>--urls "http://127.0.0.1:8080;http://[::1]:8080"; without it $PORT (Cloud Run, Container Apps) on all interfaces, else 127.0.0.1:8080.</summary>
    private static string[] ParseUrls(string? urls)
    {
        if (urls is not null)
        {
            var list = urls.Split([';', ','], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            foreach (var url in list)
                if (!Uri.TryCreate(url.Replace("*", "localhost").Replace("+", "localhost"), UriKind.Absolute, out var uri) || uri.Scheme != "http")
                    throw new UsageException($"--urls takes http://HOST:PORT addresses, got '{url}'");
            if (list.Length == 0) throw new UsageException("--urls is empty");
            return list;
        }
        string? port = Environment.GetEnvironmentVariable("PORT");
        if (port is not null)
        {
            if (!int.TryParse(port, out int p) || p < 0 || p > 65535) throw new UsageException($"PORT must be a port number, got '{port}'");
            return [$"http://0.0.0.0:{p}"];
        }
        return ["http://127.0.0.1:8080"];
    }
}
