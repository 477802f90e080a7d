using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.ExceptionServices;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>Process-wide threading settings for the kernels.</summary>
public static class KernelThreading
{
    private static int s_maxThreads = Environment.ProcessorCount;

    /// <summary>Most threads one kernel call uses (default: <see cref="Environment.ProcessorCount"/>). 1 runs every kernel on the calling thread.</summary>
    public static int MaxThreads
    {
        get => Volatile.Read(ref s_maxThreads);
        set
        {
            ArgumentOutOfRangeException.ThrowIfLessThan(value, 1);
            Volatile.Write(ref s_maxThreads, value);
        }
    }

    /// <summary>
    /// Runs <paramref name="body"/> for items 0..count-1, spread over up to <see cref="MaxThreads"/> threads when
    /// <paramref name="parallel"/> is set (the caller decides from the amount of work), else in order on this thread.
    /// The calling thread works too; the others come from a persistent pool, so a call allocates nothing. A call made
    /// while the pool is busy (from inside a work item, or from a second thread at the same time) runs serially.
    /// The first exception a work item throws is rethrown here once every thread has stopped.
    /// </summary>
    internal static void For<TBody>(int count, bool parallel, TBody body) where TBody : struct, IWorkItems
    {
        int threads = Math.Min(MaxThreads, count);
        if (!parallel || threads < 2 || !WorkerPool.TryRun(count, threads, ref body))
        {
            for (int i = 0; i < count; i++)
                body.Run(i);
        }
    }
}

/// <summary>A batch of independent work items; a struct so that no call allocates a closure.</summary>
internal interface IWorkItems
{
    void Run(int item);
}

/// <summary>
/// Background threads that run <see cref="KernelThreading.For"/> batches beside the calling thread, one batch at a time.
/// A batch is published by bumping <see cref="s_generation"/>; a worker that took part in the last batch spins on it
/// briefly (kernel calls come in quick succession while decoding) and then sleeps until it is woken for a batch that
/// wants it. Workers join a batch through <see cref="s_entry"/>, which holds an "open" flag plus the number of workers
/// inside, so the caller can close the batch and wait for exactly the workers that joined before its body (on the
/// caller's stack) goes away.
/// </summary>
internal static unsafe class WorkerPool
{
    private const int Open = 1 << 30;
    // How long an idle thread spins before it sleeps: longer than the gaps between the kernel calls of one decode step.
    private static readonly long s_spinTicks = Stopwatch.Frequency * 100 / 1_000_000;

    private static readonly ManualResetEventSlim s_workersDone = new(false, 0);
    private static Worker[] s_workers = [];   // only grows; read and written by the pool owner
    private static int s_busy;                // 1 while a caller owns the pool
    private static int s_generation;          // bumped once per published batch
    private static int s_wanted;              // workers the current batch asks for (worker i takes part when i < s_wanted)
    private static int s_entry;               // Open flag + workers inside the batch

    // The batch: its body (on the caller's stack) and the typed function that runs one item of it.
    private static void* s_body;
    private static delegate*<void*, int, void> s_runItem;
    private static int s_count;
    private static int s_next;
    private static Exception? s_error;

    /// <summary>True: every item ran (or the first exception is rethrown). False: the pool is busy; nothing ran.</summary>
    public static bool TryRun<TBody>(int count, int threads, ref TBody body) where TBody : struct, IWorkItems
    {
        if (Interlocked.CompareExchange(ref s_busy, 1, 0) != 0)
            return false;
        try
        {
            int wanted = threads - 1;
            EnsureWorkers(wanted);
            s_body = Unsafe.AsPointer(ref body);
            s_runItem = &RunItem<TBody>;
            s_count = count;
            s_next = 0;
            s_error = null;
            s_wanted = wanted;
            s_workersDone.Reset();
            Volatile.Write(ref s_entry, Open);
            Interlocked.Increment(ref s_generation);   // a full fence: the batch is visible before any sleeping flag is read
            Worker[] workers = s_workers;
            for (int i = 0; i < wanted; i++)
                workers[i].WakeIfSleeping();

            RunItems();

            // Close the batch; wait for the workers that joined it (a late one finds it closed and leaves it alone).
            if (Interlocked.Add(ref s_entry, -Open) != 0)
                WaitForWorkers();
            s_body = null;
            Exception? error = s_error;
            if (error != null)
            {
                s_error = null;
                ExceptionDispatchInfo.Throw(error);
            }
            return true;
        }
        finally
        {
            Volatile.Write(ref s_busy, 0);
        }
    }

    /// <summary>
    /// Bytes the pool's threads have allocated, as of the last batch each took part in (the threads' own counters; for
    /// the tests that prove a warm call allocates nothing on any thread).
    /// </summary>
    internal static long WorkerAllocatedBytes
    {
        get
        {
            long total = 0;
            foreach (Worker worker in Volatile.Read(ref s_workers))
                total += worker.AllocatedBytes;
            return total;
        }
    }

    private static void RunItem<TBody>(void* body, int item) where TBody : struct, IWorkItems =>
        Unsafe.AsRef<TBody>(body).Run(item);

    /// <summary>Claims and runs items until none are left; the first exception stops the batch.</summary>
    private static void RunItems()
    {
        delegate*<void*, int, void> runItem = s_runItem;
        void* body = s_body;
        int count = s_count;
        try
        {
            int item;
            while ((item = Interlocked.Increment(ref s_next) - 1) < count)
                runItem(body, item);
        }
        catch (Exception e)
        {
            Interlocked.CompareExchange(ref s_error, e, null);
            Volatile.Write(ref s_next, count);
        }
    }

    /// <summary>Waits for the last worker to leave the closed batch; it signals the event, so that signal is never left over for the next batch.</summary>
    private static void WaitForWorkers()
    {
        long deadline = Stopwatch.GetTimestamp() + s_spinTicks;
        while (!s_workersDone.IsSet)
        {
            if (Stopwatch.GetTimestamp() > deadline)
            {
                s_workersDone.Wait();
                return;
            }
            Thread.SpinWait(4);
        }
    }

    /// <summary>Starts workers up to <paramref name="wanted"/>; only the pool owner calls it.</summary>
    private static void EnsureWorkers(int wanted)
    {
        if (s_workers.Length >= wanted)
            return;
        var workers = new Worker[wanted];
        s_workers.CopyTo(workers, 0);
        for (int index = s_workers.Length; index < wanted; index++)
        {
            var worker = new Worker(index, Volatile.Read(ref s_generation));
            new Thread(worker.Loop) { IsBackground = true, Name = $"PaliGemma kernel worker {index + 1}" }.Start();
            workers[index] = worker;
        }
        s_workers = workers;
    }

    private sealed class Worker(int index, int seenGeneration)
    {
        private readonly object _gate = new();
        private int _sleeping;
        private long _allocatedBytes;

        public long AllocatedBytes => Volatile.Read(ref _allocatedBytes);

        public void Loop()
        {
            bool wanted = false;
            while (true)
            {
                // A worker the last batch wanted expects the next one soon; the others sleep until they are wanted.
                WaitForBatch(spin: wanted);
                wanted = index < Volatile.Read(ref s_wanted);
                if (!wanted || !TryEnter())
                    continue;
                // Checked again inside: the batch cannot change now, and the first check may have read an older one.
                if (index < Volatile.Read(ref s_wanted))
                {
                    RunItems();
                    Volatile.Write(ref _allocatedBytes, GC.GetAllocatedBytesForCurrentThread());
                }
                // Leaving a closed batch as its last worker wakes the caller.
                if (Interlocked.Decrement(ref s_entry) == 0)
                    s_workersDone.Set();
            }
        }

        private static bool TryEnter()
        {
            int entry = Volatile.Read(ref s_entry);
            while ((entry & Open) != 0)
            {
                int seen = Interlocked.CompareExchange(ref s_entry, entry + 1, entry);
                if (seen == entry)
                    return true;
                entry = seen;
            }
            return false;
        }

        private void WaitForBatch(bool spin)
        {
            long deadline = spin ? Stopwatch.GetTimestamp() + s_spinTicks : 0;
            while (Volatile.Read(ref s_generation) == seenGeneration)
            {
                if (Stopwatch.GetTimestamp() > deadline)
                {
                    Sleep();
                    break;
                }
                Thread.SpinWait(4);
            }
            seenGeneration = Volatile.Read(ref s_generation);
        }

        private void Sleep()
        {
            lock (_gate)
            {
                // The flag is set with a full fence before the generation is read again; the publisher bumps the
                // generation and then reads the flag, so one of the two always sees the other.
                Interlocked.Exchange(ref _sleeping, 1);
                while (Volatile.Read(ref s_generation) == seenGeneration)
                    Monitor.Wait(_gate);
                Volatile.Write(ref _sleeping, 0);
            }
        }

        public void WakeIfSleeping()
        {
            if (Volatile.Read(ref _sleeping) == 0)
                return;
            lock (_gate)
                Monitor.Pulse(_gate);
        }
    }
}
