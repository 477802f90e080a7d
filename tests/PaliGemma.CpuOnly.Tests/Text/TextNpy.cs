using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Text;

/// <summary>Integer .npy files (ids, masks, labels) through the project's reader.</summary>
internal static class TextNpy
{
    public static (long[] Values, int[] Shape) ReadIntegers(string path)
    {
        var array = Npy.Read(path);
        return (array.ToInt64(), array.Shape.Select(d => checked((int)d)).ToArray());
    }
}
