namespace PaliGemma.CpuOnly.Model;

/// <summary>Where a long step has got to: <see cref="Stage"/> is "vision" or "prefill", counted in layers.</summary>
public readonly record struct InferenceProgress(string Stage, int Done, int Total);
