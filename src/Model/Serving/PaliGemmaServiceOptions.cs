namespace PaliGemma.CpuOnly.Model.Serving;

/// <summary>Limits of a <see cref="PaliGemmaService"/>: how many requests run at once and how much KV cache memory they may hold.</summary>
public sealed record PaliGemmaServiceOptions
{
    /// <summary>
    /// Requests that may hold a session at once; later ones wait (asynchronously, cancellably) in arrival order.
    /// Every request's kernels already spread over the cores, so a small number (the default, 4) keeps latency low while
    /// letting one request's single-threaded steps overlap another's.
    /// </summary>
    public int MaxConcurrentSessions { get; init; } = 4;

    /// <summary>
    /// Bytes of KV cache that sessions may hold together, counting caches kept idle for reuse (those are dropped first when
    /// a new request needs room). A request whose own cache is larger than this fails at once with an
    /// <see cref="ArgumentException"/>; one that merely has to wait for others waits. Default 2 GiB.
    /// </summary>
    public long MaxKvCacheBytes { get; init; } = 2L << 30;

    /// <summary>
    /// KV caches are made for the request's prompt plus its new tokens rounded up to a multiple of this, so that caches of
    /// one size serve many requests. The rounding depends on the request only, so results never depend on which cache a
    /// request happened to get. Default 256 positions.
    /// </summary>
    public int KvCacheCapacityStep { get; init; } = 256;

    /// <summary>How the model is opened by <see cref="PaliGemmaService.LoadAsync"/> (tokenizer path, merged LoRA adapter).</summary>
    public PaliGemmaLoadOptions LoadOptions { get; init; } = new();

    public void Validate()
    {
        if (MaxConcurrentSessions < 1) throw new ArgumentOutOfRangeException(nameof(MaxConcurrentSessions), MaxConcurrentSessions, "at least one session must be allowed");
        if (MaxKvCacheBytes < 1) throw new ArgumentOutOfRangeException(nameof(MaxKvCacheBytes), MaxKvCacheBytes, "the KV cache budget must be positive");
        if (KvCacheCapacityStep < 1) throw new ArgumentOutOfRangeException(nameof(KvCacheCapacityStep), KvCacheCapacityStep, "the capacity step must be at least 1");
        ArgumentNullException.ThrowIfNull(LoadOptions);
    }
}
