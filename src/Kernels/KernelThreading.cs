namespace PaliGemma.CpuOnly.Kernels;

/// <summary>Process-wide threading settings for the kernels.</summary>
public static class KernelThreading
{
    private static ParallelOptions s_options = new() { MaxDegreeOfParallelism = Environment.ProcessorCount };

    /// <summary>Most threads one kernel call uses (default: <see cref="Environment.ProcessorCount"/>). 1 runs every kernel on the calling thread.</summary>
    public static int MaxThreads
    {
        get => Volatile.Read(ref s_options).MaxDegreeOfParallelism;
        set
        {
            ArgumentOutOfRangeException.ThrowIfLessThan(value, 1);
            Volatile.Write(ref s_options, new ParallelOptions { MaxDegreeOfParallelism = value });
        }
    }

    internal static ParallelOptions Options => Volatile.Read(ref s_options);

    /// <summary>
    /// Runs <paramref name="body"/> for items 0..count-1, spread over up to <see cref="MaxThreads"/> threads when
    /// <paramref name="parallel"/> is set (the caller decides from the amount of work), else in order on this thread.
    /// </summary>
    internal static void For<TBody>(int count, bool parallel, TBody body) where TBody : struct, IWorkItems
    {
        ParallelOptions options = Options;
        if (!parallel || count < 2 || options.MaxDegreeOfParallelism == 1)
        {
            for (int i = 0; i < count; i++)
                body.Run(i);
            return;
        }
        RunParallel(count, options, body);
    }

    // Its own method: a lambda capturing a parameter allocates its closure at method entry, which would tax the serial path too.
    private static void RunParallel<TBody>(int count, ParallelOptions options, TBody body) where TBody : struct, IWorkItems =>
        Parallel.For(0, count, options, i => body.Run(i));
}

/// <summary>A batch of independent work items; a struct so the serial path allocates nothing.</summary>
internal interface IWorkItems
{
    void Run(int item);
}
