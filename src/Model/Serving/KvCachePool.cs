namespace PaliGemma.CpuOnly.Model.Serving;

/// <summary>
/// Hands out KV caches under two limits, a number of sessions and a byte budget, and keeps returned caches for reuse.
/// Requests that do not fit wait in arrival order (the first waiter is served before any later one, so a large request
/// is not starved by a stream of small ones). Idle caches count against the budget and are dropped, oldest first,
/// when a request needs their room.
/// </summary>
internal sealed class KvCachePool
{
    private readonly Func<int, KvCache> _create;
    private readonly Func<int, long> _bytesFor;
    private readonly object _gate = new();
    private readonly LinkedList<Waiter> _waiters = new();
    private readonly LinkedList<KvCache> _idle = new();   // oldest first
    private int _active;
    private long _activeBytes, _idleBytes;
    private bool _closed;
    private TaskCompletionSource? _drained;

    public KvCachePool(int maxSessions, long maxBytes, Func<int, KvCache> create, Func<int, long> bytesFor)
    {
        MaxSessions = maxSessions;
        MaxBytes = maxBytes;
        _create = create;
        _bytesFor = bytesFor;
    }

    public int MaxSessions { get; }
    public long MaxBytes { get; }

    public int ActiveSessions { get { lock (_gate) return _active; } }
    public int WaitingRequests { get { lock (_gate) return _waiters.Count; } }
    public long ActiveBytes { get { lock (_gate) return _activeBytes; } }
    public long IdleBytes { get { lock (_gate) return _idleBytes; } }

    /// <summary>Waits for a session slot and room for a cache of <paramref name="capacity"/> positions, then hands one out.</summary>
    /// <exception cref="ArgumentException">The cache alone exceeds the byte budget, so the request can never run.</exception>
    public async Task<Lease> RentAsync(int capacity, CancellationToken cancellationToken)
    {
        long bytes = _bytesFor(capacity);
        if (bytes > MaxBytes)
            throw new ArgumentException(
                $"the request needs a KV cache of {capacity} positions ({bytes:N0} bytes) but the service allows {MaxBytes:N0} bytes in all " +
                $"({nameof(PaliGemmaServiceOptions)}.{nameof(PaliGemmaServiceOptions.MaxKvCacheBytes)}); shorten the prompt or MaxNewTokens, or raise the limit",
                "request");
        cancellationToken.ThrowIfCancellationRequested();

        Waiter waiter;
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_closed, this);
            if (_waiters.Count == 0 && TryAdmit(capacity, bytes, out var reused))
                return Complete(capacity, bytes, reused);
            waiter = new Waiter(capacity, bytes);
            waiter.Node = _waiters.AddLast(waiter);
        }

        KvCache? granted;
        using (cancellationToken.Register(() => Cancel(waiter, cancellationToken)))
            granted = await waiter.Task.ConfigureAwait(false);
        return Complete(capacity, bytes, granted);
    }

    /// <summary>Gives a cache back: kept for reuse, then waiting requests are admitted in order.</summary>
    public void Return(KvCache cache, long bytes)
    {
        List<(Waiter Waiter, KvCache? Cache)>? admitted = null;
        lock (_gate)
        {
            _active--;
            _activeBytes -= bytes;
            if (!_closed)
            {
                _idle.AddLast(cache);
                _idleBytes += bytes;
                // More idle caches than sessions are never all needed at once.
                while (_idle.Count > MaxSessions) DropOldestIdle();
            }
            while (_waiters.First is { } first && TryAdmit(first.Value.Capacity, first.Value.Bytes, out var reused))
            {
                _waiters.RemoveFirst();
                first.Value.Node = null;
                (admitted ??= []).Add((first.Value, reused));
            }
            if (_closed && _active == 0) _drained?.TrySetResult();
        }
        if (admitted is not null)
            foreach (var (waiter, reused) in admitted) waiter.TrySetResult(reused);
    }

    /// <summary>Refuses new requests, fails the waiting ones, drops idle caches and completes once every session is back.</summary>
    public Task CloseAsync()
    {
        List<Waiter> failed;
        Task drained;
        lock (_gate)
        {
            _closed = true;
            failed = [.. _waiters];
            _waiters.Clear();
            foreach (var waiter in failed) waiter.Node = null;
            while (_idle.Count > 0) DropOldestIdle();
            _drained ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            if (_active == 0) _drained.TrySetResult();
            drained = _drained.Task;
        }
        foreach (var waiter in failed) waiter.TrySetException(new ObjectDisposedException(nameof(PaliGemmaService), "the service was disposed while the request waited for a session"));
        return drained;
    }

    // Under the lock: takes a slot and either an idle cache of exactly this capacity or room for a new one.
    private bool TryAdmit(int capacity, long bytes, out KvCache? reused)
    {
        reused = null;
        if (_active >= MaxSessions) return false;
        for (var node = _idle.Last; node is not null; node = node.Previous)
        {
            if (node.Value.Capacity != capacity) continue;
            reused = node.Value;
            _idle.Remove(node);
            _idleBytes -= bytes;
            _active++;
            _activeBytes += bytes;
            return true;
        }
        if (_activeBytes + bytes > MaxBytes) return false;   // even with every idle cache dropped
        while (_activeBytes + _idleBytes + bytes > MaxBytes) DropOldestIdle();
        _active++;
        _activeBytes += bytes;
        return true;
    }

    private void DropOldestIdle()
    {
        var oldest = _idle.First!.Value;
        _idle.RemoveFirst();
        _idleBytes -= _bytesFor(oldest.Capacity);
    }

    private Lease Complete(int capacity, long bytes, KvCache? reused)
    {
        if (reused is not null) return new Lease(this, reused, bytes);
        try
        {
            return new Lease(this, _create(capacity), bytes);
        }
        catch
        {
            // The slot and bytes were reserved for a cache that could not be made.
            ReleaseReservation(bytes);
            throw;
        }
    }

    private void ReleaseReservation(long bytes)
    {
        List<(Waiter Waiter, KvCache? Cache)>? admitted = null;
        lock (_gate)
        {
            _active--;
            _activeBytes -= bytes;
            while (_waiters.First is { } first && TryAdmit(first.Value.Capacity, first.Value.Bytes, out var reused))
            {
                _waiters.RemoveFirst();
                first.Value.Node = null;
                (admitted ??= []).Add((first.Value, reused));
            }
            if (_closed && _active == 0) _drained?.TrySetResult();
        }
        if (admitted is not null)
            foreach (var (waiter, reused) in admitted) waiter.TrySetResult(reused);
    }

    private void Cancel(Waiter waiter, CancellationToken cancellationToken)
    {
        lock (_gate)
        {
            // Already admitted: the grant stands and the request sees its cancellation at its next check.
            if (waiter.Node is null) return;
            _waiters.Remove(waiter.Node);
            waiter.Node = null;
        }
        waiter.TrySetCanceled(cancellationToken);
    }

    /// <summary>A session's hold on a cache and its slot; disposing gives both back (once).</summary>
    public sealed class Lease : IDisposable
    {
        private KvCachePool? _pool;

        internal Lease(KvCachePool pool, KvCache cache, long bytes)
        {
            _pool = pool;
            Cache = cache;
            Bytes = bytes;
        }

        public KvCache Cache { get; }
        public long Bytes { get; }

        public void Dispose() => Interlocked.Exchange(ref _pool, null)?.Return(Cache, Bytes);
    }

    private sealed class Waiter(int capacity, long bytes) : TaskCompletionSource<KvCache?>(TaskCreationOptions.RunContinuationsAsynchronously)
    {
        public int Capacity { get; } = capacity;
        public long Bytes { get; } = bytes;
        public LinkedListNode<Waiter>? Node { get; set; }
    }
}
